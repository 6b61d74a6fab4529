"""Distilling a Hugging Face causal LM end to end: an ``hf:`` text dataset (``text=COLUMN``,
packed with EOS between documents), ``train-teacher --model hf:DIR``, ``cache-logits`` with top-k
rows, ``train-student --student hf:DIR`` (a config only: seeded random init), and the run's
``hf/`` loaded by transformers alone in a process that never imports kd-pipeline, giving the very
logits of ``student.pt``. Also what is refused before training: another vocabulary, custom code
(``auto_map``) without ``--trust-code DIR``, mixed ``hf:`` options; and a broken transformers
import named as such.

Everything is built here: a byte-level BPE trained with ``tokenizers``, a 2-layer GPT-2 teacher
config and a 1-layer Llama student config of dimension 16-32, a ``datasets`` DatasetDict saved
with ``save_to_disk``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from stages.cli import main  # noqa: E402

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven"]
SEQ = 16


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 30)))) for _ in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict:
    """A tokenizer (with ``<|endoftext|>``), teacher and student configs, and a text dataset."""
    import datasets
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("hflm")
    train_docs, test_docs = documents(160, 0), documents(40, 1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        train_docs,
        trainers.BpeTrainer(
            vocab_size=300,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<|endoftext|>"],
            show_progress=False,
        ),
    )
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")
    teacher = root / "teacher"
    GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=eos, eos_token_id=eos,
    ).save_pretrained(teacher)  # fmt: skip
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(
        teacher
    )
    student = root / "student"
    LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        bos_token_id=eos, eos_token_id=eos,
    ).save_pretrained(student)  # fmt: skip
    data = root / "corpus"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": train_docs}),
            "test": datasets.Dataset.from_dict({"text": test_docs}),
        }
    ).save_to_disk(str(data))
    spec = f"hf:{data}:train:text=text:tokenizer={teacher}:seq={SEQ}"
    return {
        "root": root, "teacher": teacher, "student": student, "data": data, "spec": spec,
        "vocab": vocab, "eos": eos, "tok": tok, "train_docs": train_docs,
    }  # fmt: skip


# ------------------------------------------------------------------------------------ the data
def test_text_is_packed_with_eos_between_documents(world: dict) -> None:
    from pipeline.datasets import load_dataset

    data = load_dataset(world["spec"])
    tok, eos = world["tok"], world["eos"]
    stream = []
    for doc in world["train_docs"]:
        stream += tok.encode(doc, add_special_tokens=False).ids + [eos]
    n = len(stream) // (SEQ + 1)
    windows = np.asarray(stream[: n * (SEQ + 1)]).reshape(n, SEQ + 1)
    np.testing.assert_array_equal(data.x, windows[:, :-1])
    np.testing.assert_array_equal(data.y, windows[:, 1:])
    assert data.num_classes == world["vocab"]
    # Boundaries: the first token of each document (the one after an EOS, and the very first).
    after_eos = np.zeros(len(stream), dtype=bool)
    after_eos[0] = True
    after_eos[1:] = np.asarray(stream[:-1]) == eos
    expected = after_eos[: n * (SEQ + 1)].reshape(n, SEQ + 1)[:, :-1]
    np.testing.assert_array_equal(data.doc_starts, expected)
    assert data.source["documents"] == len(world["train_docs"])
    assert data.source["separator"] == {"eos_id": eos}


def test_the_tokenizer_is_part_of_the_fingerprint(world: dict, tmp_path: Path) -> None:
    from pipeline.datasets import load_dataset

    with_bpe = load_dataset(world["spec"])
    with_bytes = load_dataset(f"hf:{world['data']}:train:text=text:seq={SEQ}")
    assert with_bytes.tokenizer.kind == "bytes"
    assert with_bytes.source["separator"] == {"text": "\n\n"}  # the byte-level one has no EOS
    assert with_bpe.fingerprint != with_bytes.fingerprint
    assert load_dataset(world["spec"]).fingerprint == with_bpe.fingerprint


def test_one_jsonl_file_is_divided_by_document(world: dict, tmp_path: Path) -> None:
    from pipeline.datasets import load_dataset

    path = tmp_path / "docs.jsonl"
    docs = documents(50, 3)
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    train = load_dataset(f"hf:{path}:train:text=body:seq=8:test=0.2")
    test = load_dataset(f"hf:{path}:test:text=body:seq=8:test=0.2")
    assert (train.source["documents"], test.source["documents"]) == (40, 10)
    assert train.fingerprint != test.fingerprint


@pytest.mark.parametrize(
    ("suffix", "needle"),
    [
        (":text=text:x=image", "x= applies to image or array columns"),
        (":seq=8", "seq= applies to text columns; name the column with text=COLUMN"),
        (":text=body", "no text column 'body'; columns: ['text']"),
    ],
)
def test_hf_options_do_not_mix(world: dict, suffix: str, needle: str) -> None:
    code, out = cli(
        "train-teacher", "--dataset", f"hf:{world['data']}:train{suffix}",
        "--model", f"hf:{world['teacher']}", "--out", str(world["root"] / "never"),
    )  # fmt: skip
    assert code == 2, out
    assert needle in out
    assert "Traceback" not in out


# ------------------------------------------------------------------------ teacher -> student
@pytest.fixture(scope="module")
def distilled(world: dict) -> dict:
    """train-teacher (1 epoch), cache-logits (top-16), train-student --student hf:DIR."""
    root = world["root"]
    code, out = cli(
        "train-teacher", "--dataset", world["spec"], "--model", f"hf:{world['teacher']}",
        "--members", "1", "--epochs", "1", "--batch-size", "16", "--lr", "0.003",
        "--out", str(root / "teacher-run"), "--device", "cpu",
    )  # fmt: skip
    assert code == 0, out
    cache = root / "top16.zarr"
    code, out = cli(
        "cache-logits", "--teacher", str(root / "teacher-run"), "--dataset", world["spec"],
        "--store", "topk:16", "--out", str(cache), "--quiet",
    )  # fmt: skip
    assert code == 0, out
    code, out = cli(
        "train-student", "--cache", str(cache), "--student", f"hf:{world['student']}",
        "--epochs", "1", "--batch-size", "16", "--lr", "0.003", "-T", "2", "--alpha", "0.7",
        "--out", str(root / "run"), "--device", "cpu",
    )  # fmt: skip
    assert code == 0, out
    assert "hf/ (transformers)" in out
    return {"teacher": root / "teacher-run", "cache": cache, "run": root / "run"}


LOAD_ALONE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for directory in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    with torch.no_grad():
        out[directory] = {"logits": model(input_ids=ids).logits.tolist(), "eos": tok.eos_token}
mine = sorted(m for m in sys.modules if m == "pipeline" or m.startswith(("pipeline.", "stages")))
print(json.dumps({"models": out, "kd": mine}))
"""


def load_alone(ids: np.ndarray, *directories: Path) -> dict:
    """``directories`` loaded by transformers in a fresh process without kd-pipeline on its path:
    ``{"models": {DIR: {"logits", "eos"}}, "kd": [kd-pipeline modules it imported]}``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run(
        [sys.executable, "-c", LOAD_ALONE, json.dumps(ids.tolist()), *map(str, directories)],
        capture_output=True, text=True, env=env, cwd=directories[0].parent.parent, check=False,
        timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def kd_logits(checkpoint: Path, ids: np.ndarray) -> np.ndarray:
    """(B, P, V) logits of a kd-pipeline checkpoint."""
    import torch

    from pipeline.checkpoints import load_checkpoint

    with torch.no_grad():
        return load_checkpoint(checkpoint).model(torch.as_tensor(ids)).numpy()


def test_the_exports_give_the_checkpoints_logits(world: dict, distilled: dict) -> None:
    """Fast variant (in this process): run/hf and the teacher's hf/ loaded with
    AutoModelForCausalLM give the logits of student.pt and member-0.pt."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.datasets import load_dataset

    run = distilled["run"]
    assert (run / "hf" / "model.safetensors").is_file()
    assert (run / "hf" / "tokenizer.json").is_file()
    test = load_dataset(f"hf:{world['data']}:test:text=text:tokenizer={world['teacher']}:seq={SEQ}")
    ids = test.x[:3].astype(np.int64)
    for checkpoint, exported in (
        (run / "student.pt", run / "hf"),
        (distilled["teacher"] / "member-0.pt", distilled["teacher"] / "hf"),
    ):
        model = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
        with torch.no_grad():
            theirs = model(input_ids=torch.as_tensor(ids)).logits.numpy()
        np.testing.assert_allclose(theirs, kd_logits(checkpoint, ids), rtol=0, atol=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]["test"]
    assert metrics["dataset"].startswith(f"hf:{world['data']}:test:text=text")
    assert 1 < metrics["perplexity"] < world["vocab"]


@pytest.mark.slow  # a fresh process importing transformers: about 20 s on a shared machine
def test_the_student_loads_with_transformers_alone(world: dict, distilled: dict) -> None:
    """The done-when check: a process that imports transformers and nothing of kd-pipeline
    loads run/hf (and the teacher's hf/) and gets the kd-pipeline checkpoints' logits."""
    run, teacher = distilled["run"], distilled["teacher"]
    ids = (np.arange(2 * SEQ, dtype=np.int64).reshape(2, SEQ) * 7) % world["vocab"]
    alone = load_alone(ids, run / "hf", teacher / "hf")
    assert alone["kd"] == []
    for checkpoint, exported in (
        (run / "student.pt", run / "hf"),
        (teacher / "member-0.pt", teacher / "hf"),
    ):
        got = alone["models"][str(exported)]
        assert got["eos"] == "<|endoftext|>"
        np.testing.assert_allclose(
            np.asarray(got["logits"]), kd_logits(checkpoint, ids), rtol=0, atol=1e-5
        )


def test_another_vocabulary_is_refused_before_training(
    world: dict, distilled: dict, tmp_path: Path
) -> None:
    config = json.loads((world["student"] / "config.json").read_text())
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    code, out = cli(
        "train-student", "--cache", str(distilled["cache"]), "--student", f"hf:{wide}",
        "--epochs", "1", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 2, out
    assert (
        f"vocabulary differs: hf:{wide} has a vocabulary of 512 tokens (config.json vocab_size), "
        f"the cache's has {world['vocab']} tokens" in out
    )
    assert not (tmp_path / "run" / "history.csv").exists()


def test_custom_code_needs_trust_code(world: dict, distilled: dict, tmp_path: Path) -> None:
    config = json.loads((world["student"] / "config.json").read_text())
    custom = tmp_path / "custom"
    custom.mkdir()
    auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    (custom / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    code, out = cli(
        "train-student", "--cache", str(distilled["cache"]), "--student", f"hf:{custom}",
        "--epochs", "1", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 2, out
    assert "names custom modelling code (auto_map: modeling_evil.EvilForCausalLM)" in out
    assert f"re-run with --trust-code {custom}" in out
    code, out = cli(
        "train-teacher", "--dataset", world["spec"], "--model", f"hf:{custom}",
        "--out", str(tmp_path / "t"),
    )  # fmt: skip
    assert code == 2 and f"--trust-code {custom}" in out, out


def test_trust_code_is_only_for_hf_models(world: dict, tmp_path: Path) -> None:
    code, out = cli(
        "train-teacher", "--dataset", world["spec"], "--model", "gpt:layers=1,dim=8,heads=2",
        "--trust-code", str(tmp_path), "--out", str(tmp_path / "t"),
    )  # fmt: skip
    assert code == 2
    assert "--trust-code allows an hf:DIR model's custom code; gpt models have none" in out


def test_a_transformers_that_fails_to_import_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed transformers whose import breaks (a broken optional dependency) is said to
    be so, not reported as missing or as a model that 'cannot be loaded'."""
    from pipeline.errors import ModelSpecError
    from pipeline.sequences.hf import import_transformers

    fake = tmp_path / "site" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ModelSpecError) as e:
        import_transformers("hf:somewhere")
    assert str(e.value).startswith(
        "hf:somewhere: transformers is installed but fails to import (RuntimeError: operator "
        "torchvision::nms missing); a broken optional dependency of it, not the model"
    )


def test_trust_code_runs_the_allowed_directory_only(
    world: dict, distilled: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --trust-code DIR, a config whose auto_map names its own classes (a GPT-2 subclass
    here) trains, and hf/ carries the code; another directory stays refused."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # transformers appends its module cache
    custom = tmp_path / "custom"
    custom.mkdir()
    config = {
        "model_type": "tiny-custom",
        "architectures": ["TinyLM"],
        "auto_map": {
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyLM",
        },
        "vocab_size": world["vocab"], "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2,
    }  # fmt: skip
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "configuration_tiny.py").write_text(
        "from transformers import GPT2Config\n\n\nclass TinyConfig(GPT2Config):\n"
        "    model_type = 'tiny-custom'\n"
    )
    (custom / "modeling_tiny.py").write_text(
        "from transformers import GPT2LMHeadModel\n\nfrom .configuration_tiny import TinyConfig"
        "\n\n\nclass TinyLM(GPT2LMHeadModel):\n    config_class = TinyConfig\n"
    )
    args = ("--epochs", "1", "--batch-size", "16", "--device", "cpu")
    code, out = cli(
        "train-student", "--cache", str(distilled["cache"]), "--student", f"hf:{custom}",
        "--trust-code", str(tmp_path / "elsewhere"), *args, "--out", str(tmp_path / "refused"),
    )  # fmt: skip
    assert code == 2 and f"--trust-code {custom}" in out, out
    code, out = cli(
        "train-student", "--cache", str(distilled["cache"]), "--student", f"hf:{custom}",
        "--trust-code", str(custom), *args, "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 0, out
    exported = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    assert exported["architectures"] == ["TinyLM"]
    assert (tmp_path / "run" / "hf" / "modeling_tiny.py").is_file()


def test_a_config_alone_is_seeded_and_no_teacher(world: dict, tmp_path: Path) -> None:
    """A config-only directory builds the same weights under the same seed, other ones under
    another; given as a teacher it is refused (random logits), naming train-teacher."""
    import torch

    from pipeline.checkpoints import load_hf_model
    from pipeline.errors import CheckpointError
    from pipeline.models import build_model

    def weights(seed: int) -> dict:
        torch.manual_seed(seed)
        return build_model(f"hf:{world['student']}", (SEQ,), world["vocab"]).state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(CheckpointError, match="holds a config.json but no weights") as e:
        load_hf_model(str(world["student"]))
    assert f"kd-pipeline train-teacher --model hf:{world['student']}" in str(e.value)
