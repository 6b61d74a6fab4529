"""The library API for training loops other than kd-pipeline's own (``docs/library-api.md``).

- :class:`CacheDataset`: a torch ``IterableDataset`` over any cache (dense, top-k, sampled; view
  and token caches), one ``{"inputs", "targets", "labels"}`` item per sample, memory-bounded
  (shards streamed beyond a budget) and DDP-aware; :func:`collate_soft_targets` batches items.
- :func:`kd_loss`: the paper's loss, exactly as ``train-student`` computes it, for dense and
  sparse targets.
- :class:`SparseTargets`: a batch of top-k or sampled targets (what sparse caches' ``targets``
  are).

Example::

    from pipeline.api import CacheDataset, kd_loss

    ds = CacheDataset("data/caches/mnist.zarr", temperature=4.0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in ds.loader(batch_size=128):
            logits = student(batch["inputs"].float())
            loss = kd_loss(logits, batch["targets"], 4.0, 0.9, batch.get("labels"))
"""

from pipeline.training.dataset import CacheDataset, collate_soft_targets
from pipeline.training.functional import kd_loss
from pipeline.training.targets import SparseTargets

__all__ = ["CacheDataset", "SparseTargets", "collate_soft_targets", "kd_loss"]
