"""Distil a tiny Hugging Face causal LM from a kd-pipeline token cache with ``transformers.Trainer``
(``docs/library-api.md``).

    python examples/hf_trainer.py CACHE OUT_DIR [--temperature 2] [--alpha 0.5] [--epochs 3]

The cache is a token cache (``kd-pipeline cache-logits`` on a ``text:`` or ``tokens:`` dataset,
any storage kind). The only change to a stock ``Trainer`` is ``compute_loss``: the student's
logits against the cached soft targets with :func:`pipeline.api.kd_loss`. Prints one JSON line:
the logged training losses, and how often the student's top token is the teacher's before and
after training.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from pipeline.api import CacheDataset, SparseTargets, collate_soft_targets, kd_loss


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss is the paper's: soft targets at T (scaled by T^2) + hard labels."""

    def __init__(self, *args: object, temperature: float, alpha: float, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.temperature, self.alpha = temperature, alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["inputs"]).logits  # (B, P, V)
        # The cache's labels are each position's next token already: no shift.
        loss = kd_loss(logits, inputs["targets"], self.temperature, self.alpha, inputs["labels"])
        return (loss, logits) if return_outputs else loss


def agreement(model: torch.nn.Module, ds: CacheDataset) -> float:
    """The fraction of positions whose top token is the same for the student and the teacher."""
    same = total = 0
    model.eval()
    with torch.no_grad():
        for batch in ds.loader(batch_size=16):
            t = batch["targets"]
            top = t.flat().top_class() if isinstance(t, SparseTargets) else t.argmax(-1)
            student = model(input_ids=batch["inputs"]).logits.argmax(-1).reshape(-1)
            same += int((student == top.reshape(-1)).sum())
            total += top.numel()
    return same / total


def main(cache: str, out: str, temperature: float, alpha: float, epochs: int) -> dict:
    ds = CacheDataset(cache, temperature=temperature)
    positions = ds.sample_shape[0]
    torch.manual_seed(0)
    student = GPT2LMHeadModel(
        GPT2Config(vocab_size=ds.num_classes, n_positions=positions, n_embd=32, n_layer=1, n_head=2)
    )
    before = agreement(student, ds)
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=8,
        num_train_epochs=epochs,
        learning_rate=3e-3,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,  # the batch's keys are ours, not the model's arguments
        dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(
        model=student,
        args=args,
        train_dataset=ds,  # Trainer calls ds.set_epoch(epoch) before each epoch
        data_collator=collate_soft_targets,
        temperature=temperature,
        alpha=alpha,
    )
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"losses": losses, "agreement_before": before, "agreement_after": agreement(student, ds)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache")
    p.add_argument("out")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args()
    print(json.dumps(main(a.cache, a.out, a.temperature, a.alpha, a.epochs)))
