"""Hugging Face causal LMs as teachers and students: loading rules, checks and the export.

- **Offline, no foreign code.** ``transformers`` is always called with ``local_files_only=True``;
  ``trust_remote_code`` is passed (as True) only for a directory the user allowed with
  ``--trust-code DIR``: a ``config.json`` with an ``auto_map`` (custom modelling code shipped
  beside the weights) is otherwise refused before transformers sees it (:func:`trusted_code`,
  :func:`custom_code_allowed`).
- **A config is enough.** A directory without weight files builds the architecture with seeded
  random weights (a student to distil into, or a teacher to train).
- **The vocabulary must match.** A student's ``vocab_size`` must equal the cache's vocabulary V
  (a wider, padded head only with the very same ``tokenizer.json`` in its directory), and its
  context must cover the sequences (:func:`student_problems`): refused before training.
- **The export.** A trained HF model is also written with ``save_pretrained`` (safetensors) to
  ``hf/`` in the run or teacher directory, with the data's tokenizer when it has one
  (:func:`export_hf`), so ``AutoModelForCausalLM.from_pretrained(run/hf)`` loads it with
  transformers alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.errors import ModelSpecError, UntrustedCodeError
from pipeline.models import is_trusted
from pipeline.progress import transformers_bars_on_terminal_only

if TYPE_CHECKING:
    from pipeline.sequences.tokenizers import Tokenizer

# Weight files transformers' from_pretrained reads; a directory with none is a config to build.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# The tokenizer files an HF model directory carries besides tokenizer.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_TRUSTED: ContextVar[tuple[str, ...]] = ContextVar("kd_hf_trusted_code", default=())


@contextmanager
def trusted_code(trust_code: Iterable[str]) -> Iterator[None]:
    """Within this block, ``hf:DIR`` models whose directory is in ``trust_code`` (``--trust-code``)
    may run their custom code; every other ``auto_map`` config is refused."""
    token = _TRUSTED.set((*_TRUSTED.get(), *trust_code))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def import_transformers(spec: str) -> ModuleType:
    """The ``transformers`` module, or one message saying why it cannot be used.

    An installed transformers that fails to import is named as such, with the likely cause (a
    torchvision built for another torch), not as a missing package.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only everywhere
    try:
        import transformers
    except Exception as e:  # noqa: BLE001 - a broken optional dependency raises anything
        if importlib.util.find_spec("transformers") is None:
            raise ModelSpecError(
                f"{spec} needs the `transformers` package: pip install 'kd-pipeline[hf]'"
            ) from None
        raise ModelSpecError(
            f"{spec}: transformers is installed but fails to import ({type(e).__name__}: "
            f"{str(e)[:160]}); a broken optional dependency of it, not the model"
            + (_torchvision_note() or "; reinstall transformers and its dependencies")
        ) from None
    return transformers


def read_config(root: Path, spec: str) -> dict:
    """``DIR/config.json`` as a dict (refused when absent or not JSON)."""
    path = root / "config.json"
    if not path.is_file():
        raise ModelSpecError(
            f"{spec}: no config.json there; give a directory written by a transformers model's "
            "save_pretrained, or holding a config.json alone for a randomly initialised model "
            "(nothing is downloaded)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSpecError(f"{spec}: config.json is not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise ModelSpecError(f"{spec}: config.json holds {type(config).__name__}, not an object")
    return config


def has_weights(root: Path) -> bool:
    """Whether ``root`` holds weights (else it is a config to initialise)."""
    return any((root / f).is_file() for f in WEIGHT_FILES) or any(root.glob("*.safetensors"))


def custom_code_allowed(root: Path, config: dict, spec: str) -> bool:
    """Whether ``root``'s custom code may run: False without ``auto_map``; True when the user
    allowed the directory (``--trust-code DIR``).

    Raises:
        UntrustedCodeError: the config names custom code that was not allowed.
    """
    auto_map = config.get("auto_map")
    if not auto_map:
        return False
    if is_trusted(str(root), _TRUSTED.get()):
        return True
    names = (
        ", ".join(sorted(map(str, auto_map.values()))) if isinstance(auto_map, dict) else auto_map
    )
    raise UntrustedCodeError(
        f"{spec}: its config.json names custom modelling code (auto_map: {names}) that "
        "transformers would import and run from that directory; kd-pipeline never runs code you "
        f"did not allow, and nothing was imported. If you trust it, re-run with --trust-code {root}"
    )


def missing_code_files(root: Path, auto_map: Any) -> list[str]:
    """The code files an allowed ``auto_map`` names that ``root`` lacks: ``module.Class`` needs
    ``root/module.py``; ``repo--module.Class`` (code in another repository) is never there, as
    nothing is downloaded."""
    refs = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    missing = []
    for ref in refs:
        for one in ref if isinstance(ref, list) else [ref]:
            if not isinstance(one, str) or "." not in one:  # e.g. a tokenizer pair's None
                continue
            module = one.rsplit(".", 1)[0]
            if "--" in module or not (root / f"{module.replace('.', '/')}.py").is_file():
                missing.append(f"{module}.py" if "--" not in module else one)
    return sorted(set(missing))


def student_problems(
    body: Any, vocab: int, tokenizer: Tokenizer, positions: int, against: str = "the cache's"
) -> list[str]:
    """Why an ``hf:DIR`` model cannot be trained on this data: its vocabulary and context.

    Args:
        body: the :class:`~pipeline.sequences.models.HFCausalLM`.
        vocab: V, the data's (the cache's) vocabulary.
        tokenizer: the data's tokenizer.
        positions: P, tokens per sequence.
        against: whose vocabulary V is, for the message.
    """
    from pipeline.sequences.tokenizers import JsonTokenizer

    spec = f"hf:{body.directory}"
    problems = []
    width = int(body.width)
    own = Path(body.directory) / "tokenizer.json"
    same_tokenizer = False
    if own.is_file():
        mine = JsonTokenizer.load(own)
        same_tokenizer = mine.sha256 == tokenizer.sha256
        if not same_tokenizer:
            problems.append(
                f"{spec} comes with a tokenizer of {mine.vocab_size} tokens "
                f"({mine.sha256[:19]}), {against} is a {tokenizer.kind} tokenizer of {vocab} "
                f"tokens ({tokenizer.sha256[:19]}); token ids of different tokenizers mean "
                "different text: use a model made for that tokenizer"
            )
    if width != vocab and not (width > vocab and same_tokenizer):
        problems.append(
            f"vocabulary differs: {spec} has a vocabulary of {width} tokens (config.json "
            f"vocab_size), {against} has {vocab} tokens; give the model vocab_size={vocab} "
            "(the teacher's tokenizer)"
        )
    if positions > body.ctx:
        problems.append(
            f"{spec} has a context of {body.ctx} tokens (max_position_embeddings), shorter than "
            f"the sequences of {positions}; give it a longer context or use a smaller seq="
        )
    return problems


def export_hf(model: nn.Module, out: Path, tokenizer: Tokenizer | None) -> Path | None:
    """Write an ``hf:DIR`` model (``model`` a KDModel or the HFCausalLM) as ``out`` with
    ``save_pretrained`` (safetensors), with ``tokenizer`` when it is a ``tokenizer.json``.

    The directory is written beside ``out`` and renamed into place, so a run never shows half an
    export. Returns ``out``, or None when ``model`` is not a transformers model.
    """
    from pipeline.sequences.tokenizers import JsonTokenizer

    body = getattr(model, "body", model)
    if not isinstance(body, HFCausalLM):
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with transformers_bars_on_terminal_only():
        body.lm.save_pretrained(str(tmp), safe_serialization=True)
    if isinstance(tokenizer, JsonTokenizer):
        _save_tokenizer(tokenizer, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _save_tokenizer(tokenizer: Any, where: Path) -> None:
    """The tokenizer files of an HF model directory: copied when the tokenizer came from one
    (its ``tokenizer_config.json`` keeps the special tokens), else wrapped and saved."""
    src = Path(tokenizer.path).parent if tokenizer.path else None
    if src is not None and (src / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, where / name)
        return
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tokenizer.impl).save_pretrained(str(where))


def hf_export_dirs(out: Path, members: int) -> Sequence[Path]:
    """Where ``train-teacher`` exports its members: ``hf/`` for one, ``hf/member-<i>`` else."""
    if members == 1:
        return [out / "hf"]
    return [out / "hf" / f"member-{i}" for i in range(members)]


# ------------------------------------------------------------------------------------ the model
class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM from a local directory: (B, P) ids -> (B, P, W) logits.

    ``DIR`` holds a ``config.json`` and, for a pretrained model, its weights; a directory with a
    config only builds the architecture with freshly initialised weights (seeded by the caller's
    ``torch.manual_seed``), e.g. a student to distil into. Nothing is ever downloaded
    (``local_files_only``), and a config that names custom code (``auto_map``) is refused unless
    the directory is allowed with ``--trust-code DIR`` (:func:`pipeline.sequences.hf.trusted_code`).
    """

    token_inputs = True

    def __init__(self, directory: str) -> None:
        super().__init__()
        spec = f"hf:{directory}"
        transformers = import_transformers(spec)
        root = Path(directory)
        config = read_config(root, spec)
        trust = custom_code_allowed(root, config, spec)  # raises when not allowed
        kw: dict = {"local_files_only": True}
        if trust:  # only for a directory the user allowed: never by default
            kw["trust_remote_code"] = True
            missing = missing_code_files(root, config.get("auto_map"))
            if missing:  # else transformers' message points to the Hub, where nothing is read
                raise ModelSpecError(
                    f"{spec}: its config.json names custom code that is not in {root}: "
                    f"{', '.join(missing)}; models are read from their directory alone "
                    "(nothing is downloaded): put the code files beside config.json"
                )
        self.directory = directory
        self.pretrained = has_weights(root)
        try:
            with transformers_bars_on_terminal_only():
                self.lm = self._build(transformers, directory, kw, trust)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ModelSpecError(
                f"hf:{directory}: cannot load it ({type(e).__name__}: {e})" + _torchvision_note()
            ) from e
        self.width = int(self.lm.config.vocab_size)
        self.ctx = int(getattr(self.lm.config, "max_position_embeddings", 0) or 1 << 30)

    def _build(self, transformers: ModuleType, directory: str, kw: dict, trust: bool) -> nn.Module:
        """The model: its weights when the directory has them, else built from its config."""
        if self.pretrained:
            return transformers.AutoModelForCausalLM.from_pretrained(directory, **kw)
        cfg = transformers.AutoConfig.from_pretrained(directory, **kw)
        return transformers.AutoModelForCausalLM.from_config(
            cfg, **({"trust_remote_code": True} if trust else {})
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=x.long(), use_cache=False).logits


def _torchvision_note() -> str:
    """The likely cause when transformers fails to import or load a model: it imports a present
    torchvision, and one built for another torch fails with errors that name other modules."""
    from pipeline.tv import torchvision_problem

    problem = torchvision_problem()
    return f"; the likely cause: {problem}" if problem else ""
