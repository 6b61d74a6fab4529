"""Experiment tracking: every run's metrics as JSON lines, and the trackers of ``--log-to``.

Every :func:`~pipeline.training.loop.fit` that writes a history (``history.csv``, a teacher
member's ``member-I.history.csv``) also writes its metrics as JSON lines beside it
(``metrics.jsonl``, ``member-I.metrics.jsonl``), for any tool; ``--log-to tensorboard`` writes
the same records as TensorBoard event files in the run directory's ``tensorboard/`` folder
(``tensorboard/member-I/`` for a teacher's members). Both are one :class:`Tracking` callback of
the one training loop, not a loop of their own. The format is in ``docs/tracking.md``.

Records (one JSON object a line, in this order):

- ``{"record": "config", "config": {...}}``: the resolved config, once, first.
- ``{"record": "step", "epoch", "step", "loss", "soft", "hard", "train_errors", "lr"}``: each
  optimiser step (means over the step's rows; ``train_errors`` counts them; ``lr`` is the rate
  the step used); token students trained on labels (``alpha < 1``) add ``train_nll`` (the hard
  term: the mean next-token NLL) and ``train_perplexity`` (its exp).
- ``{"record": "eval", "epoch", "step", ...}``: a ``--eval-every`` measurement.
- ``{"record": "epoch", "epoch", "step", ...}``: an epoch's row, exactly as in ``history.csv``
  (plus ``train_nll`` / ``train_perplexity`` as for steps).

A step's values live on the training device; reading them is a device sync. They are buffered
and read :data:`FLUSH_STEPS` steps at a time (one sync each), so tracking adds no sync per step.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from pipeline.errors import ConfigError, MissingExtraError
from pipeline.registry import Registry
from pipeline.training.callbacks import Callback, FitState

#: Steps whose values are read from the device (and written) together.
FLUSH_STEPS = 50

#: The metrics file beside ``history.csv`` (a teacher member's: ``member-I.metrics.jsonl``).
METRICS_FILE = "metrics.jsonl"


class Sink:
    """Where :class:`Tracking` writes the records (see the module docstring)."""

    def start(self, config: dict) -> None:
        """Record the resolved config, once, before the first step."""

    def write(self, records: list[dict]) -> None:
        """Write step, eval and epoch records, in order."""

    def close(self) -> None:
        """Training ended: flush and close."""


class JsonLines(Sink):
    """The records as JSON lines in ``path`` (replaced at the start of a fit).

    Non-finite numbers (an overflowed perplexity) are written as ``null``: JSON has no ``inf``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[str] | None = None

    def start(self, config: dict) -> None:
        self.file = open(self.path, "w")  # noqa: SIM115 - open for the whole fit, closed in close()
        self._put([{"record": "config", "config": config}])

    def write(self, records: list[dict]) -> None:
        self._put(records)

    def _put(self, records: list[dict]) -> None:
        assert self.file is not None, "start() opens the file"
        for r in records:
            self.file.write(json.dumps(_finite(r), default=str) + "\n")
        self.file.flush()  # a reader (or a kill) sees whole lines up to the last flush

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class TensorBoard(Sink):
    """The records as TensorBoard scalars (``torch.utils.tensorboard.SummaryWriter``).

    Tags: ``step/<name>`` at the optimiser step, ``epoch/<name>`` at the epoch number (1-based),
    ``eval/<name>`` at the step of a ``--eval-every`` measurement; the config as the HParams
    plugin's hyper-parameters (dotted keys) and as a JSON text (``config``). Event files of an
    earlier fit in the same folder are removed first: TensorBoard would draw both as one run.
    """

    #: The package this tracker needs, and the extra that installs it.
    module = "tensorboard"
    extra = "tensorboard"

    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        logdir.mkdir(parents=True, exist_ok=True)
        for old in logdir.glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(logdir))

    def start(self, config: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = {k: _hparam(v) for k, v in _flatten(config).items()}
        metrics = {f"epoch/{k}": 0.0 for k in ("loss", "soft", "hard", "train_errors")}
        experiment, start, self._end = hparams(flat, metrics)
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(start)
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", f"```\n{text}\n```")

    def write(self, records: list[dict]) -> None:
        for r in records:
            kind = r["record"]
            at = r["epoch"] if kind == "epoch" else r["step"]
            for k, v in r.items():
                if k not in ("record", "epoch", "step", "steps") and _number(v):
                    self.writer.add_scalar(f"{kind}/{k}", v, at)
        self.writer.flush()

    def close(self) -> None:
        self.writer.file_writer.add_summary(self._end)
        self.writer.close()


def _config_error(message: str) -> ConfigError:
    return ConfigError([message])


#: The trackers ``--log-to`` offers: name -> the sink that writes them; plug-ins from the entry
#: point group ``kd_pipeline.trackers``.
LOGGERS: Registry[type[TensorBoard]] = Registry("trackers", "tracker", _config_error)
LOGGERS.register("tensorboard", "TensorBoard event files in RUN/tensorboard/", TensorBoard)


def tracker(name: str) -> type[TensorBoard]:
    """The sink registered as ``name`` in :data:`LOGGERS`.

    Raises:
        ConfigError: no tracker has that name.
    """
    return LOGGERS.get(name)


def check_trackers(names: Sequence[str]) -> None:
    """Refuse, before anything trains, a tracker whose package is not installed.

    Raises:
        ConfigError: an unknown name.
        MissingExtraError: the tracker's package is missing (the message names the extra).
    """
    for name in names:
        sink = tracker(name)
        try:
            importlib.import_module(sink.module)
        except ImportError:
            raise MissingExtraError(f"--log-to {name}", sink.module, sink.extra) from None


class Tracking(Callback):
    """A fit's records (see the module docstring) written to every sink.

    Args:
        sinks: where they go (:class:`JsonLines`, and a :class:`TensorBoard` for
            ``--log-to tensorboard``).
        config: the resolved config, recorded once.
        token_nll: the loss's hard term is the mean next-token NLL of a token student (its
            ``measures_nll``): records add ``train_nll`` and ``train_perplexity``.
    """

    def __init__(self, sinks: list[Sink], config: dict, token_nll: bool = False) -> None:
        self.sinks, self.token_nll = sinks, token_nll
        # Records waiting for their device values: (record, tensors to read into it).
        self.pending: list[tuple[dict, dict[str, torch.Tensor]]] = []
        for s in sinks:  # now: a fit that fails before its first step leaves no earlier metrics
            s.start(config)

    def on_step_end(self, state: FitState) -> None:
        record = {"record": "step", "epoch": state.epoch, "step": state.step, "lr": state.step_lr}
        self.pending.append((record, dict(state.step_values)))
        if state.step_eval is not None:
            self.pending.append(({"record": "eval", **state.step_eval}, {}))
        if len(self.pending) >= FLUSH_STEPS:
            self._flush()

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        record = {"record": "epoch", **{k: v for k, v in row.items() if not _nested(v)}}
        record["step"] = row.get("steps", state.step)
        record.pop("steps", None)
        self._add_nll(record)
        self.pending.append((record, {}))
        self._flush()

    def on_fit_end(self, state: FitState) -> None:
        self._flush()
        for s in self.sinks:
            s.close()

    def on_fit_error(self, state: FitState) -> None:
        # What was tracked so far is written; the training's own error is the one to report
        # (not a second one from a device that failed with it).
        with contextlib.suppress(Exception):
            self.on_fit_end(state)

    def _flush(self) -> None:
        if not self.pending:
            return
        tensors = [t.float() for _, values in self.pending for t in values.values()]
        read = iter(torch.stack(tensors).tolist() if tensors else [])  # the one device sync
        records = []
        for record, values in self.pending:
            got = {k: next(read) for k in values}
            if "train_errors" in got:
                got["train_errors"] = None if got["train_errors"] < 0 else int(got["train_errors"])
            # the values first, in the order of the module docstring, then the rest (lr)
            rest = {k: v for k, v in record.items() if k not in ("record", "epoch", "step")}
            merged = {"record": record["record"], "epoch": record.get("epoch")}
            merged.update(step=record.get("step"), **got, **rest)
            if merged["record"] == "step":
                self._add_nll(merged)
            records.append(merged)
        self.pending = []
        for s in self.sinks:
            s.write(records)

    def _add_nll(self, record: dict) -> None:
        if self.token_nll and isinstance(record.get("hard"), float):
            record["train_nll"] = record["hard"]
            record["train_perplexity"] = _exp(record["hard"])


def tracking_hooks(
    history_csv: str | Path, log_to: Sequence[str], config: dict, token_nll: bool = False
) -> list[Callback]:
    """The tracking of a fit whose history goes to ``history_csv``: ``metrics.jsonl`` beside it
    (``member-I.metrics.jsonl`` beside ``member-I.history.csv``), and each ``--log-to`` tracker
    in the run directory (TensorBoard: ``tensorboard/``, or ``tensorboard/member-I/``)."""
    history = Path(history_csv)
    stem = history.name.removesuffix(".csv").removesuffix("history").rstrip(".")
    out = history.parent
    sinks: list[Sink] = [JsonLines(out / (f"{stem}.{METRICS_FILE}" if stem else METRICS_FILE))]
    for name in log_to:
        # Each tracker writes into the run directory's folder named after it (the CLI says so).
        sinks.append(tracker(name)(out / name / stem if stem else out / name))
    return [Tracking(sinks, config, token_nll)]


def _nested(v: Any) -> bool:
    return isinstance(v, (list, dict))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _hparam(v: Any) -> int | float | str | bool:
    """A value the HParams plugin takes: numbers and booleans as they are, the rest as text."""
    if isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, default=str)
