"""Shared test helpers (plain functions; fixtures live in ``tests/conftest.py``).

Test modules import from here, never from one another:

- ``cli``: the CLI in process (click's runner), the one-error assertion, the command tree;
- ``process``: the CLI and Python in a subprocess, waiting for and killing processes, peak RSS;
- ``torchrun``: ``train-student`` under the real ``torchrun`` with a write-auditing hook;
- ``s3``: moto's S3 server on 127.0.0.1 and uploading a directory to the bucket;
- ``data``: tiny seeded datasets made in code (npz image tasks, a text corpus);
- ``images``: image folders and torchvision weights made in code;
- ``caches``: small seeded caches (given logits, a teacher's, each storage kind, views, tokens)
  and reading a cache's arrays raw;
- ``damage``: damaging a copy of a cache (arrays and header edited with zarr itself, stored
  objects deleted or their bytes changed), as a directory, a bundle or on S3;
- ``optional``: importing an optional package, or skipping with why.
"""
