"""kd-pipeline's library: everything the CLI does, usable without the CLI.

Modules, by what they hold:

- ``errors``: the one exception type users see (``KDError``) and its kinds.
- ``datasets``: dataset specs (``NAME:SPLIT[:key=value...]``), the dataset registry, fingerprints.
- ``models``: model specs (``mlp:1200,1200``, ``cnn``, ``torchscript:PATH``,
  ``py:module:factory``), the registry.
- ``checkpoints``: saving/loading models with their metadata, safely (``weights_only=True``).
- ``losses``: the paper's losses behind one signature, and ensemble combination.
- ``metrics``: test errors, accuracy, NLL, ECE, agreement.
- ``training``: the one training loop every mode uses.
- ``cache``: the Zarr logit cache format (imports without torch).
- ``devices``: picking a torch device without hard-coding one.
"""

__version__ = "0.1.0"
