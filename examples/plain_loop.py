"""Distil a student from a kd-pipeline cache in a plain PyTorch loop (``docs/library-api.md``).

    python examples/plain_loop.py CACHE [--temperature 4] [--alpha 0.9] [--epochs 5]

Prints one JSON line: the mean loss of each epoch, and how often the student's top class is the
teacher's before and after training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from pipeline.api import CacheDataset, SparseTargets, kd_loss


def agreement(student: torch.nn.Module, ds: CacheDataset) -> float:
    """The fraction of samples whose top class is the same for the student and the teacher."""
    same = total = 0
    with torch.no_grad():
        for batch in ds.loader(batch_size=256):
            t = batch["targets"]
            teacher_top = t.top_class() if isinstance(t, SparseTargets) else t.argmax(-1)
            same += int((student(batch["inputs"]).argmax(-1) == teacher_top).sum())
            total += len(teacher_top)
    return same / total


def main(cache: str, temperature: float, alpha: float, epochs: int, lr: float) -> dict:
    torch.manual_seed(0)
    ds = CacheDataset(cache, temperature=temperature)
    if ds.tokens:
        # An MLP over one sample's raw inputs cannot read token ids: a language model can.
        print(
            f"error: {cache} is a token cache (sequences of {ds.sample_shape[0]} tokens); this "
            "example trains an MLP classifier. Use examples/hf_trainer.py for token caches.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    alpha = alpha if ds.labeled else 1.0  # no hard labels: the soft term alone
    mean, std = ds.input_stats
    student = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(math.prod(ds.sample_shape), 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, ds.num_classes),
    )
    model = lambda x: student((x.float() - mean) / std)  # noqa: E731 - the inputs are raw
    before = agreement(model, ds)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    losses = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)  # a new shuffle (and shard order) every epoch
        total = 0.0
        for batch in ds.loader(batch_size=64):
            loss = kd_loss(
                model(batch["inputs"]), batch["targets"], temperature, alpha, batch.get("labels")
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch["inputs"])
        losses.append(total / len(ds))
    return {"losses": losses, "agreement_before": before, "agreement_after": agreement(model, ds)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args()
    print(json.dumps(main(a.cache, a.temperature, a.alpha, a.epochs, a.lr)))
