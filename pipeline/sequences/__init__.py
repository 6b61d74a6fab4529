"""Sequence data: tokenisers (:mod:`.tokenizers`) and token-sequence datasets (:mod:`.data`,
which registers the ``text:`` and ``tokens:`` dataset sources; :mod:`.hf_text`, the ``hf:``
source, text with ``text=COLUMN`` else images and arrays) and sequence models (:mod:`.models`:
``gpt:``, ``hf:DIR`` from :mod:`.hf`, which also holds the Hugging Face rules and export)."""

from pipeline.sequences import data as data  # registers the sources
from pipeline.sequences import hf_text as hf_text  # registers hf: (text and images)
from pipeline.sequences import models as models  # registers gpt: and hf:
