"""Sequence data: tokenisers (:mod:`.tokenizers`), token-sequence datasets (:mod:`.data`: the
``text:`` and ``tokens:`` dataset sources) and sequence models (:mod:`.models`: ``gpt:``,
``hf:DIR``). Both registries import their modules on first lookup (the one built-ins list,
:data:`pipeline.builtins.BUILTINS`); importing this package imports neither."""
