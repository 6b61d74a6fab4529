"""Sequence data: tokenisers (:mod:`.tokenizers`) and token-sequence datasets (:mod:`.data`,
which registers the ``text:`` and ``tokens:`` dataset sources) and sequence models
(:mod:`.models`: ``gpt:``, ``hf:DIR``)."""

from pipeline.sequences import data as data  # registers the sources
from pipeline.sequences import models as models  # registers gpt: and hf:
