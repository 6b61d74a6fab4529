"""``kd-pipeline``: the click group behind the console script.

The group lists its commands by name and short help and imports one only when it runs (or shows
its own ``--help``): ``kd-pipeline --help`` and ``--version`` import neither torch nor any
command's code. The commands live in ``stages/commands.py``, ``stages/cache_cli.py`` and
``stages/specialists_cli.py``; every option is generated from the config field that declares it
(``stages/params.py``).
"""

from __future__ import annotations

import click

from pipeline import __version__
from stages.lazy import LazyGroup

#: name -> (where the command is, its short help in the group's --help: the first paragraph of
#: its own help, which ``tests/stages/test_run_files.py`` checks).
COMMANDS = {
    "train-teacher": (
        "stages.commands:train_teacher",
        "Train a teacher ensemble; writes member-<i>.pt checkpoints and ensemble.json under --out.",
    ),
    "evaluate": (
        "stages.commands:evaluate",
        "Test errors (count), accuracy, NLL and ECE of a checkpoint or an ensemble and its "
        "members.",
    ),
    "cache-logits": (
        "stages.commands:cache_logits",
        "Stage one: run the teachers once over the transfer set into a Zarr logit cache.",
    ),
    "train-student": (
        "stages.commands:train_student",
        "Stage two: train a student on cached soft targets at temperature T plus weighted hard "
        "labels.",
    ),
    "sweep": (
        "stages.commands:sweep",
        "Train a grid (students x temperatures x alphas x seeds) from one cache, each setting a "
        "dask task.",
    ),
    "reproduce": (
        "stages.commands:reproduce",
        "The paper's experiments over the public stages, with a Markdown report next to the "
        "paper's numbers.",
    ),
    "specialists": (
        "stages.specialists_cli:specialists_group",
        "Specialist ensembles (paper section 5) on a generalist's logit cache.",
    ),
    "bench": (
        "stages.commands:bench",
        "Measure what the cache buys, as ratios in one run: P1 epoch cost, P2 a sweep from the "
        "cache vs online KD, P3 caching overhead, P4 streaming vs the codec limit, P5 size (per "
        "storage kind too), P6 a top-k vs a dense loader epoch; each against its goal (met or "
        "not), with a warning when the machine is loaded or repeats disagree.",
    ),
    "storage-study": (
        "stages.commands:storage_study",
        "Cache one teacher in every storage kind (dense, topk:K, sampled:S) and train the same "
        "student from each: bytes per row, fidelity at T = 1, 4, 20 and test errors relative to "
        "the dense cache, in OUT/report.md.",
    ),
    "sequence-study": (
        "stages.commands:sequence_study",
        "Distil a language model on the shipped corpus: teacher, dense/topk/sampled caches, "
        "students from each, next tokens only and online KD; perplexity, bits/byte, bytes/token "
        "in report.md.",
    ),
    "demo": (
        "stages.commands:demo",
        "The main job on the shipped Fashion-MNIST: teacher ensemble, logit cache, baseline vs "
        "distilled students.",
    ),
    "cache": (
        "stages.cache_cli:cache_group",
        "Inspect, verify, bundle, copy and list logit caches.",
    ),
}


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(__version__, prog_name="kd-pipeline")
def main() -> None:
    """Knowledge distillation (Hinton, Vinyals & Dean 2015) in two stages.

    Stage one (cache-logits) runs a teacher ensemble once over a transfer set and stores its raw
    logits in a Zarr cache; stage two (train-student) trains students from that cache, so sweeping
    temperature, weight and student costs only student training.

    Dataset specs: NAME:SPLIT[:key=value...], e.g. fashion-mnist:train, mnist:test, idx:DIR:train,
    npz:FILE:train, with modifiers exclude=3 | keep=0,1 | fraction=0.03 | count=1000 | seed=N.

    Outputs without --out go under data/ in the current directory (or $KD_OUTPUT_DIR).

    Freed memory is kept for reuse rather than returned to the kernel after every batch (glibc;
    KD_MALLOC=default keeps the C library's own settings).
    """
    from pipeline.allocator import keep_freed_memory

    keep_freed_memory()


if __name__ == "__main__":  # pragma: no cover
    main()
