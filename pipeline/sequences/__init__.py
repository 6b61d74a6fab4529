"""Token sequences: their tokenisers, datasets and models (entries of the registries).

Tokenisers (:mod:`.tokenizers`), token-sequence datasets (:mod:`.data`: the
``text:`` and ``tokens:`` dataset sources; :mod:`.hf_text`: the ``hf:`` source, text with
``text=COLUMN``, else images and arrays) and sequence models (:mod:`.models`: ``gpt:``, ``hf:DIR``
from :mod:`.hf`, which also holds the Hugging Face rules and export). The registries import these
modules on first lookup (the one built-ins list, :data:`pipeline.builtins.BUILTINS`); importing
this package imports none of them."""
