"""Sequence models in the model registry: ``gpt:...`` (a small causal transformer) and ``hf:DIR``.

Both map token ids (B, P) to next-token logits (B, P, W). W may be wider than the tokenizer's
vocabulary V (padded heads, as real language models have: ``gpt:...:pad=64`` rounds W up to a
multiple of 64, and a Hugging Face model's ``vocab_size`` is often padded); every consumer keeps the
first V logits (:func:`token_rows`), so padded logits never reach a cache or a loss.

- ``gpt:layers=4,dim=256,heads=4,ctx=256[,dropout=0.1][,pad=1]`` (options separated by ``,`` or
  ``:``, each optional): pre-norm transformer
  blocks with learned positions and a causal mask; ``ctx`` must cover the dataset's length P.
- ``hf:DIR``: a causal language model saved locally with ``transformers``
  (``save_pretrained``), loaded with ``local_files_only`` (never a download) and without remote
  code (unless ``--trust-code DIR``); a directory holding only a ``config.json`` builds the
  architecture with seeded random weights (a student). ``pip install 'kd-pipeline[hf]'``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.errors import ModelSpecError
from pipeline.models import register_model
from pipeline.sequences.hf import HFCausalLM
from pipeline.specs import positive_int, probability, spec_options


class GPT(nn.Module):
    """Token embedding + learned positions, ``layers`` causal pre-norm blocks, a linear head.

    ``forward``: (B, P) int token ids -> (B, P, W) logits, W = ``width``.
    """

    token_inputs = True  # KDModel hands it the ids as they are (nothing to normalise)

    def __init__(
        self, width: int, layers: int, dim: int, heads: int, ctx: int, dropout: float
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ModelSpecError(f"gpt: dim={dim} must be a multiple of heads={heads}")
        self.ctx = ctx
        self.tok = nn.Embedding(width, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.drop = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(
            dim,
            heads,
            4 * dim,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x.shape[1]
        if p > self.ctx:
            raise ModelSpecError(f"gpt: sequences of {p} tokens exceed its context ctx={self.ctx}")
        pos = torch.arange(p, device=x.device)
        h = self.drop(self.tok(x.long()) + self.pos(pos))
        causal = nn.Transformer.generate_square_subsequent_mask(p, device=x.device)
        h = self.blocks(h, mask=causal, is_causal=True)
        return self.head(self.norm(h))


@register_model(
    "gpt", "gpt[:layers=4][:dim=256][:heads=4][:ctx=256][:pad=N] small causal transformer"
)
def _build_gpt(spec: str, parts: list[str], in_shape: tuple[int, ...], num_classes: int) -> GPT:
    o = spec_options(
        spec,
        [p for part in parts for p in part.split(",") if p],  # gpt:layers=4,dim=256 or :-separated
        {
            "layers": positive_int,
            "dim": positive_int,
            "heads": positive_int,
            "ctx": positive_int,
            "dropout": probability,
            "pad": positive_int,
        },
    )
    ctx = o.get("ctx", 256)
    if len(in_shape) != 1 or in_shape[0] > ctx:
        raise ModelSpecError(
            f"model spec {spec!r}: gpt takes token sequences (P,) with P <= ctx={ctx}; this "
            f"dataset's samples are {in_shape} (use a text: or tokens: dataset, or a larger ctx=)"
        )
    pad = o.get("pad", 1)
    width = math.ceil(num_classes / pad) * pad  # padded heads: a multiple of pad, >= V
    return GPT(
        width, o.get("layers", 4), o.get("dim", 256), o.get("heads", 4), ctx, o.get("dropout", 0.1)
    )


@register_model("hf", "hf:DIR a transformers causal LM saved locally (pip install '.[hf]')")
def _build_hf(
    spec: str, parts: list[str], in_shape: tuple[int, ...], num_classes: int
) -> HFCausalLM:
    if not parts:
        raise ModelSpecError(f"model spec {spec!r}: expected hf:DIR")
    return HFCausalLM(":".join(parts))


def token_rows(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """A sequence model's (B, P, W) logits as cache rows: (B * P, V), padded heads dropped.

    Rows are ordered by sequence, then position (the cache's row order).
    """
    if logits.shape[-1] < vocab:
        raise ModelSpecError(
            f"the model outputs {logits.shape[-1]} logits per position, fewer than the "
            f"tokenizer's {vocab} tokens"
        )
    return logits[..., :vocab].reshape(-1, vocab)


def teacher_problems(models: list, data: object) -> list[str]:
    """Why these teachers cannot run on the sequence dataset ``data``: tokenizer, width, context.

    Args:
        models: loaded checkpoints (``.meta``, ``.path``, ``.model``).
        data: a :class:`~pipeline.sequences.data.SequenceDataset`.
    """
    problems = []
    want = data.tokenizer.describe()  # type: ignore[attr-defined]
    for m in models:
        body = getattr(m.model, "body", None)
        if not getattr(body, "token_inputs", False):
            problems.append(
                f"{m.path} ({m.meta.get('model_spec')}) is not a sequence model; {data.spec} "  # type: ignore[attr-defined]
                "holds token sequences (train one with --model gpt:... or give hf:DIR)"
            )
            continue
        have = m.meta.get("tokenizer") or (m.meta.get("dataset") or {}).get("tokenizer")
        if have and have.get("sha256") != want["sha256"]:
            problems.append(
                f"tokenizer differs: {m.path} was made with a {have.get('kind')} tokenizer of "
                f"{have.get('vocab_size')} tokens ({str(have.get('sha256'))[:19]}), "
                f"{data.spec} uses a {want['kind']} tokenizer of {want['vocab_size']} tokens "  # type: ignore[attr-defined]
                f"({want['sha256'][:19]}); tokenise the data with the teacher's tokenizer "
                "(tokenizer=PATH) or train the teacher on this data"
            )
        if int(m.meta.get("num_classes", 0)) != want["vocab_size"]:
            problems.append(
                f"{m.path} predicts {m.meta.get('num_classes')} tokens, the tokenizer has "
                f"{want['vocab_size']}"
            )
        ctx = getattr(body, "ctx", None)
        if ctx is not None and data.x.shape[1] > ctx:  # type: ignore[attr-defined]
            problems.append(
                f"{m.path} has a context of {ctx} tokens, shorter than {data.spec}'s sequences "  # type: ignore[attr-defined]
                f"of {data.x.shape[1]}"  # type: ignore[attr-defined]
            )
    return problems
