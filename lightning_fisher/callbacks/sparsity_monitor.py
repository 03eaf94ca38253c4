"""``SparsityMonitor``: sparsity and accuracy every epoch, and the accuracy-vs-sparsity curve at the end.

Hooks and what each does:

- ``on_validation_epoch_end`` (or ``on_train_epoch_end`` when the run has no validation): compute the
  per-layer table (:func:`lightning_fisher.pruning.report.sparsity_report`), log ``sparsity/*`` through
  ``pl_module.log`` and append a row to the history.
- ``on_fit_end``: on global rank zero, write ``sparsity_curve.csv`` and ``sparsity_curve.png`` into the
  run directory and log the table and the image to every ``WandbLogger``; then all ranks meet at a
  barrier.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_fisher.pruning.report import global_sparsity, sparsity_report

__all__ = ["SparsityMonitor"]

STATE_VERSION = 1
COLUMNS = ("epoch", "step", "global_sparsity", "target", "accuracy")
CSV_NAME = "sparsity_curve.csv"
PNG_NAME = "sparsity_curve.png"


class SparsityMonitor(Callback):
    """Logs sparsity and accuracy every epoch; writes the accuracy-vs-sparsity curve at the end of ``fit``.

    Metrics, logged once per validation epoch (or training epoch when there is no validation) through
    ``pl_module.log``, so every logger of the trainer receives them:

    - ``sparsity/global``: zeros over elements of the pruned weights. The pruned weights are the keys of
      the ``masks`` dict (``{fqn: bool tensor}``) of every callback in ``trainer.callbacks`` that has
      one (such as :class:`~lightning_fisher.callbacks.fisher_pruning.FisherPruning`); without such a
      callback, or while its masks are still empty, all Conv2d and Linear weights.
    - ``sparsity/model``: over all Conv2d and Linear weights (the stem and classifier included).
    - ``sparsity/layer/<fqn>``: per weight (``log_per_layer``), for the Conv2d/Linear weights and the
      masked ones.
    - ``sparsity/target``: the ``scheduled_sparsity`` of the pruning callback(s) (the largest, if
      several); not logged when no callback has one.

    Zeros are counted in the weights themselves (exact zeros), not read from the masks. Each logged epoch
    also adds a row ``(epoch, step, global_sparsity, target, accuracy)`` to :attr:`history`, with the
    accuracy read from ``trainer.callback_metrics[monitor]``. The history is part of the callback's
    checkpoint state, so a resumed run writes the whole curve. Nothing is recorded during the sanity
    check, outside ``fit`` or under ``fast_dev_run``.

    At the end of ``fit``, global rank zero writes ``sparsity_curve.csv`` and ``sparsity_curve.png``
    (accuracy against sparsity with epoch labels, and both against epoch) into ``dirpath``, and logs the
    table (key ``sparsity_curve``) and the image (key ``sparsity_curve_plot``) to each ``WandbLogger``.

    Args:
        log_per_layer: also log ``sparsity/layer/<fqn>`` for each weight.
        monitor: the accuracy metric to pair with the sparsity (a key of ``trainer.callback_metrics``).
        dirpath: where to write the curve; ``None`` means ``trainer.log_dir`` (the first logger's
            directory) or, without one, ``trainer.default_root_dir``.
        log_on_train_epoch_end: record at the end of each training epoch instead of each validation
            epoch. ``None`` decides in ``setup``: at training-epoch end only when the module has no
            ``validation_step`` or ``limit_val_batches == 0``.

    Raises:
        ValueError: an empty ``monitor``.

    Example::

        trainer = L.Trainer(callbacks=[FisherPruning(target_sparsity=0.9, end_epoch=10), SparsityMonitor(monitor="val/acc")])
        trainer.fit(model, datamodule)  # then read <log_dir>/sparsity_curve.csv
    """

    def __init__(
        self,
        log_per_layer: bool = True,
        monitor: str = "val/acc",
        dirpath: str | None = None,
        log_on_train_epoch_end: bool | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={monitor!r}: must be a non-empty metric name")
        self.log_per_layer = bool(log_per_layer)
        self.monitor = monitor
        self.dirpath = dirpath
        self.log_on_train_epoch_end = log_on_train_epoch_end
        self.history: list[dict[str, Any]] = []
        self._warned_missing_monitor = False

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING and not sparsity_report(pl_module):
            raise ValueError(f"{type(pl_module).__name__} has no Conv2d or Linear weights to monitor")
        if self.log_on_train_epoch_end is None:
            self.log_on_train_epoch_end = (
                not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0
            )

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_on_train_epoch_end:
            self._record(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.log_on_train_epoch_end:
            self._record(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_skip(trainer, fitting_only=False):
            return
        if trainer.is_global_zero:
            if self.history:
                self._write_curve(trainer)
            else:
                rank_zero_warn("SparsityMonitor recorded no epochs; no sparsity curve was written")
        trainer.strategy.barrier("SparsityMonitor.on_fit_end")

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "history": [dict(row) for row in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise ValueError(f"SparsityMonitor state version {version!r}: expected {STATE_VERSION}")
        self.history = [dict(row) for row in state_dict.get("history", self.history)]

    # -------------------------------------------------------------- internals
    def _should_skip(self, trainer: L.Trainer, fitting_only: bool = True) -> bool:
        """The one guard for "not now": sanity check, ``fast_dev_run``, or not fitting."""
        return (
            trainer.sanity_checking
            or bool(trainer.fast_dev_run)
            or (fitting_only and trainer.state.fn != TrainerFn.FITTING)
        )

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_skip(trainer):
            return
        model_rows = sparsity_report(pl_module)
        masks = _masks(trainer)
        pruned_rows = sparsity_report(pl_module, list(masks)) if masks else model_rows
        sparsity = global_sparsity(pruned_rows)
        target = _scheduled_sparsity(trainer)

        pl_module.log("sparsity/global", sparsity, on_step=False, on_epoch=True)
        pl_module.log("sparsity/model", global_sparsity(model_rows), on_step=False, on_epoch=True)
        if target is not None:
            pl_module.log("sparsity/target", target, on_step=False, on_epoch=True)
        if self.log_per_layer:
            layers = {row["name"]: row["sparsity"] for row in [*model_rows, *pruned_rows]}
            for name, value in layers.items():
                pl_module.log(f"sparsity/layer/{name}", value, on_step=False, on_epoch=True)

        self.history.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "global_sparsity": sparsity,
                "target": target,
                "accuracy": self._accuracy(trainer),
            }
        )

    def _accuracy(self, trainer: L.Trainer) -> float | None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self._warned_missing_monitor:
                self._warned_missing_monitor = True
                rank_zero_warn(
                    f"SparsityMonitor(monitor={self.monitor!r}): no such metric in trainer.callback_metrics "
                    f"(available: {sorted(trainer.callback_metrics)}); the curve will have no accuracy"
                )
            return None
        return float(value)

    def _write_curve(self, trainer: L.Trainer) -> None:
        directory = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        csv_path, png_path = directory / CSV_NAME, directory / PNG_NAME
        rows = [[row.get(column) for column in COLUMNS] for row in self.history]
        with csv_path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows([["" if value is None else value for value in row] for row in rows])
        _plot_curve(self.history, self.monitor, png_path)
        rank_zero_info(f"SparsityMonitor: wrote {csv_path} and {png_path}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="sparsity_curve", columns=list(COLUMNS), data=rows)
                logger.log_image(key="sparsity_curve_plot", images=[str(png_path)])


def _masks(trainer: L.Trainer) -> dict[str, Any]:
    """The union of the ``masks`` dicts of the pruning callbacks (empty when there are none)."""
    masks: dict[str, Any] = {}
    for callback in trainer.callbacks:
        found = getattr(callback, "masks", None)
        if isinstance(found, dict):
            masks.update(found)
    return masks


def _scheduled_sparsity(trainer: L.Trainer) -> float | None:
    targets = [getattr(callback, "scheduled_sparsity", None) for callback in trainer.callbacks]
    targets = [float(target) for target in targets if isinstance(target, (int, float))]
    return max(targets) if targets else None


def _plot_curve(history: list[dict[str, Any]], monitor: str, path: Path) -> None:
    # The object-oriented Agg API, not pyplot: no global backend switch, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> list[float]:
        return [math.nan if row[key] is None else row[key] for row in history]

    epochs, sparsity, accuracy, target = series("epoch"), series("global_sparsity"), series("accuracy"), series("target")
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    curve, timeline = figure.subplots(1, 2)

    curve.plot(sparsity, accuracy, marker="o")
    for epoch, x, y in zip(epochs, sparsity, accuracy):
        if not math.isnan(y):
            curve.annotate(str(int(epoch)), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    curve.set(xlabel="global sparsity", ylabel=monitor, title=f"{monitor} vs sparsity (labels: epoch)")
    curve.grid(alpha=0.3)

    timeline.plot(epochs, sparsity, marker="o", label="global sparsity")
    if any(not math.isnan(value) for value in target):
        timeline.plot(epochs, target, linestyle="--", label="scheduled target")
    timeline.set(xlabel="epoch", ylabel="sparsity", ylim=(-0.02, 1.02), title="sparsity and accuracy by epoch")
    timeline.grid(alpha=0.3)
    accuracy_axis = timeline.twinx()
    accuracy_axis.plot(epochs, accuracy, marker="s", color="tab:green", label=monitor)
    accuracy_axis.set_ylabel(monitor)
    handles = timeline.get_legend_handles_labels()
    more = accuracy_axis.get_legend_handles_labels()
    timeline.legend(handles[0] + more[0], handles[1] + more[1], loc="lower right", fontsize=8)
    figure.savefig(path, dpi=120)
