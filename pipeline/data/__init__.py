"""Datasets that do not fit in memory: lazy sources (image folders, Hugging Face datasets on disk,
a user's torch ``Dataset``), read through a torch ``DataLoader`` and checked by content digests.

:mod:`pipeline.data.lazy` holds the lazy input array every lazy source returns, :mod:`pipeline.data
.sources` the sources themselves; :mod:`pipeline.datasets` registers them next to IDX and npz.

Also the in-memory readers and checks :mod:`pipeline.datasets` builds on: :mod:`pipeline.data.idx`
(IDX files: MNIST, Fashion-MNIST) and :mod:`pipeline.data.fingerprint` (a dataset's content
fingerprint).
"""
