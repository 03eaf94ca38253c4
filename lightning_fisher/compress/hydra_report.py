"""A Hydra callback that turns an order-search multirun into an order-of-compression report.

Add it to a multirun (the ``cifar10_resnet18_order_search`` recipe does) whose jobs each run two stages
(``stages=[a,b]``, every pair in both orders). When the sweep ends, :class:`OrderReport` reads every
job's ``compression.json`` under the sweep directory, decides the precedences, sorts them
(:mod:`lightning_fisher.compress.planner`), and writes ``order_report.md`` and ``order_report.json``
into the sweep directory.

With ``run_final=True`` it then trains the chosen chain once more in this process (the sweep's config
with ``stages`` set to the order, output in ``<sweep dir>/final``) so the report includes the final
model's size, bit-operations and accuracy. ``on_multirun_end`` runs on the machine that launched the
sweep (with the submitit launcher: the login node), so on a cluster leave ``run_final=False`` and run
the command the report prints.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_fisher.compress.planner import (
    OrderPlan,
    check_rule,
    load_records,
    plan_from_records,
)

__all__ = ["OrderReport"]

log = logging.getLogger(__name__)

FINAL_DIR = "final"


class OrderReport(Callback):
    """Hydra callback: the order-of-compression report of a pairwise sweep (Shen et al., arXiv 2403.17447).

    Args:
        metric: how a pair is decided: ``"accuracy"`` (accuracy at equal compression, the default) or
            ``"compression"`` (``compression_key`` at ``accuracy_floor``); see
            :mod:`lightning_fisher.compress.planner`.
        accuracy_floor: the floor of ``metric="compression"``, a fraction in [0, 1].
        compression_key: ``"bit_op_reduction"`` or ``"compression_ratio"`` (size).
        tie_margin: margins at or below it give no edge.
        stages: the candidate stages in the order that breaks ties; ``None``: as they appear in the runs.
        run_final: train the chosen chain after the sweep (in this process) and report it.
        filename: stem of the report files.
    """

    def __init__(
        self,
        metric: str = "accuracy",
        accuracy_floor: float | None = None,
        compression_key: str = "bit_op_reduction",
        tie_margin: float = 0.0,
        stages: list[str] | None = None,
        run_final: bool = False,
        filename: str = "order_report",
    ) -> None:
        check_rule(metric, accuracy_floor, compression_key, tie_margin)
        self.metric = metric
        self.accuracy_floor = accuracy_floor
        self.compression_key = compression_key
        self.tie_margin = tie_margin
        self.stages = None if stages is None else [str(s) for s in stages]
        self.run_final = run_final
        self.filename = filename
        self.plan: OrderPlan | None = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        plan = self.make_plan(sweep_dir)
        if self.run_final and plan.final is None and plan.order:
            self._run_final(config, plan.order, sweep_dir / FINAL_DIR)
            plan = self.make_plan(sweep_dir, include_final=True)
        md, _ = plan.write(sweep_dir, self.filename)
        self.plan = plan
        log.info("order of compression: %s (report: %s)", " -> ".join(plan.order), md)

    def make_plan(self, sweep_dir: str | Path, include_final: bool = False) -> OrderPlan:
        """The plan from the ``compression.json`` files under ``sweep_dir``."""
        records = load_records(sweep_dir, exclude=() if include_final else (FINAL_DIR,))
        if not records:
            raise FileNotFoundError(f"{sweep_dir}: no compression.json from any job of the sweep")
        dense = [r for r in _dense_accuracies(sweep_dir)]
        return plan_from_records(
            records,
            stages=self.stages,
            metric=self.metric,  # type: ignore[arg-type]
            accuracy_floor=self.accuracy_floor,
            compression_key=self.compression_key,
            tie_margin=self.tie_margin,
            dense_accuracy=sum(dense) / len(dense) if dense else None,
        )

    def _run_final(self, config: DictConfig, order: tuple[str, ...], output_dir: Path) -> None:
        from lightning_fisher.train import train

        cfg = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
        with open_dict(cfg):
            cfg.stages = list(order)
            cfg.paths.output_dir = str(output_dir)
            cfg.pop("hydra", None)
        log.info("order of compression: training the chosen chain %s in %s", list(order), output_dir)
        train(cfg)


def _dense_accuracies(sweep_dir: Path) -> list[float]:
    import json

    values = []
    for path in sorted(Path(sweep_dir).rglob("compression.json")):
        value = json.loads(path.read_text()).get("dense_accuracy")
        if value is not None:
            values.append(float(value))
    return values
