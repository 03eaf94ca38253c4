"""A chain of compression stages, each its own fine-tuning phase: ``stages=[distill, prune, quantize]``.

The pipeline of "Order of Compression" (Shen et al., arXiv 2403.17447). :func:`run_pipeline` starts
from a dense model, trained in a first phase of ``base_epochs`` or loaded from ``base_ckpt``, then runs
every stage in the order given as a fine-tuning phase of ``stage_epochs`` with a fresh ``L.Trainer`` (a
fresh optimizer and LR schedule), and finally measures the deployed model against the dense one
(:func:`~lightning_fisher.compress.metrics.compression_report`) and writes ``compression.json``.

Stages (:data:`STAGES`, each name maps to a builder and a default callback class):

- ``distill``: a fresh student of ``width_factor`` × the current width (``student_factory``) is trained
  with the current network as its frozen teacher (``KnowledgeDistillation``). The student replaces the
  network: earlier stages' effects survive only through the teacher's predictions (a pruned or
  quantized teacher gives a dense fp32 student), which is why distillation belongs early in a chain.
- ``prune``: ``FisherPruning`` for the phase. Its masks then stay exact in every later phase: a
  :class:`MaskKeeper` re-applies them after every training batch (so also after a later stage rebuilds
  the optimizer). A mask whose parameter a later stage removes (a low-rank factorisation of that layer)
  is dropped, and logged.
- ``quantize``: ``QuantizationAware``; the fake-quant modules it swaps in stay for later phases (their
  observers keep tracking the activations), keeping the same ``weight`` Parameters.
- ``low_rank``: ``LowRank``; the factored modules stay.
- ``early_exit``: ``EarlyExit``; the callback stays attached in later phases so its heads keep
  training, and the deployed model is its early-exit wrapper.

A later ``distill`` drops what the earlier stages kept attached (masks, exit heads): the new student has
none of them. Accuracy is the deployed model's top-1 accuracy on the data module's test split;
``compression.json`` also lists each phase's final validation metrics.

:func:`train_stages` is the Hydra glue used by ``lightning_fisher.train.train`` when ``cfg.stages`` is
set: settings come from the ``compress`` config group (``conf/compress/default.yaml``).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn

from lightning_fisher.compress.metrics import CompressionReport, compression_report
from lightning_fisher.module import ImageClassifier
from lightning_fisher.weights import load_weights

__all__ = [
    "STAGES",
    "MaskKeeper",
    "PhaseResult",
    "PipelineResult",
    "StagePlan",
    "evaluate_accuracy",
    "narrow_student",
    "run_pipeline",
    "train_stages",
]

log = logging.getLogger(__name__)

RECORD_FILENAME = "compression.json"
RECORD_VERSION = 1

TrainerFactory = Callable[[str, int, list[Callback]], L.Trainer]
StudentFactory = Callable[[nn.Module, float], nn.Module]


@dataclass
class StagePlan:
    """What a stage builder hands the pipeline for its phase.

    ``callbacks`` run in this phase only; ``module`` replaces the current LightningModule (distill);
    ``keep`` is called after the phase and returns the callbacks to keep attached in later phases;
    ``deploy`` maps the trained network to the one measured and evaluated (early exit).
    """

    callbacks: list[Callback]
    module: ImageClassifier | None = None
    keep: Callable[[], list[Callback]] | None = None
    deploy: Callable[[nn.Module], nn.Module] | None = None


@dataclass
class PhaseResult:
    name: str
    epochs: int
    metrics: dict[str, float]


@dataclass
class PipelineResult:
    """The outcome of :func:`run_pipeline`; :meth:`to_dict` is the content of ``compression.json``."""

    stages: tuple[str, ...]
    module: ImageClassifier
    deployed: nn.Module
    report: CompressionReport
    accuracy: float
    dense_accuracy: float | None
    phases: list[PhaseResult]
    settings: dict[str, Any] = field(default_factory=dict)
    last_trainer: L.Trainer | None = None

    def to_dict(self) -> dict[str, Any]:
        report = self.report.to_dict()
        return {
            "version": RECORD_VERSION,
            "stages": list(self.stages),
            "accuracy": self.accuracy,
            "dense_accuracy": self.dense_accuracy,
            "report": {k: _finite_or_str(v) for k, v in report.items()},
            "phases": [{"name": p.name, "epochs": p.epochs, "metrics": p.metrics} for p in self.phases],
            "settings": _plain(self.settings),
        }

    def metrics(self) -> dict[str, float]:
        """Flat metrics: the last phase's ``val/*``, the deployed ``test/acc`` and ``compress/*``."""
        out = dict(self.phases[-1].metrics) if self.phases else {}
        out["test/acc"] = self.accuracy
        if self.dense_accuracy is not None:
            out["compress/dense_acc"] = self.dense_accuracy
        for key in ("bits", "compression_ratio", "bit_ops", "bit_op_reduction"):
            out[f"compress/{key}"] = float(getattr(self.report, key))
        return out


# ------------------------------------------------------------------ masks
class MaskKeeper(Callback):
    """Keeps pruning masks exact in the phases after the prune stage.

    Re-applies ``{fqn: bool mask}`` (True = kept) after every training batch (after the optimizer step,
    whichever optimizer a stage built) and at the start and end of training. A mask follows its
    Parameter object, or, if a stage replaced the Parameter, the parameter of the same name and shape;
    when neither exists any more (the layer was factorised), the mask is dropped and logged.
    """

    def __init__(self, masks: Mapping[str, Tensor], parameters: Mapping[str, nn.Parameter] | None = None) -> None:
        super().__init__()
        self.masks = {name: mask.detach().to("cpu", torch.bool) for name, mask in masks.items()}
        self._params: dict[str, Tensor] = dict(parameters or {})
        self._device_masks: dict[str, Tensor] = {}

    def _resolve(self, pl_module: nn.Module) -> None:
        by_id = {id(p) for p in pl_module.parameters()}
        by_name = dict(pl_module.named_parameters())
        resolved: dict[str, Tensor] = {}
        for name, mask in self.masks.items():
            param = self._params.get(name)
            if param is None or id(param) not in by_id:
                param = by_name.get(name)
            if param is None or param.shape != mask.shape:
                log.info("MaskKeeper: the mask of %s is dropped: no parameter of that shape left (a later stage replaced it)", name)
                continue
            resolved[name] = param
        self.masks = {name: self.masks[name] for name in resolved}
        self._params = resolved
        self._device_masks = {name: self.masks[name].to(p.device) for name, p in resolved.items()}

    @torch.no_grad()
    def apply_(self) -> None:
        for name, param in self._params.items():
            mask = self._device_masks.get(name)
            if mask is None or mask.device != param.device:
                mask = self._device_masks[name] = self.masks[name].to(param.device)
            param.mul_(mask)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve(pl_module)
        self.apply_()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # stages that swap modules at an epoch start may have moved or replaced parameters
        self._resolve(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.apply_()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply_()

    def sparsity(self) -> float:
        """Fraction of zeros among the masked parameters (1 − kept fraction of the masks)."""
        total = sum(m.numel() for m in self.masks.values())
        if not total:
            return 0.0
        return 1.0 - sum(int(self._params[n].count_nonzero()) for n in self.masks) / total


# ------------------------------------------------------------- students
def narrow_student(net: nn.Module, width_factor: float) -> nn.Module:
    """A fresh :class:`~lightning_fisher.models.ResNet18` with ``width_factor`` × the width of ``net``.

    The width is read from ``bn1`` (never swapped by a stage); classes and input channels from the
    classifier and the first convolution.
    """
    from lightning_fisher.models import ResNet18

    if not isinstance(net, ResNet18):
        raise TypeError(
            f"net={type(net).__name__}: the default student factory narrows a ResNet18; pass student_factory= for other networks"
        )
    width = max(1, round(net.bn1.num_features * width_factor))
    in_channels = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels
    num_classes = getattr(net.fc, "out_features", None) or [m for m in net.modules() if isinstance(m, nn.Linear)][-1].out_features
    return ResNet18(num_classes=num_classes, width=width, in_channels=in_channels)


# --------------------------------------------------------------- stages
def _callback_class(target: str | type) -> Callable[..., Callback]:
    if not isinstance(target, str):
        return target
    from hydra.utils import get_class

    return get_class(target)


def _build_distill(module: ImageClassifier, settings: dict[str, Any], factory: Callable[..., Callback], make_student: Callable[[nn.Module], nn.Module]) -> StagePlan:
    teacher = copy.deepcopy(module.net)
    student = make_student(module.net)
    new_module = _same_module(module, student)
    return StagePlan(callbacks=[factory(teacher=teacher, **settings)], module=new_module)


def _build_prune(module: ImageClassifier, settings: dict[str, Any], factory: Callable[..., Callback], make_student: Callable[[nn.Module], nn.Module]) -> StagePlan:
    pruning = factory(**settings)

    def keep() -> list[Callback]:
        parameters = getattr(getattr(pruning, "pruner", None), "parameters", None)
        return [MaskKeeper(pruning.masks, parameters)]

    return StagePlan(callbacks=[pruning], keep=keep)


def _build_plain(module: ImageClassifier, settings: dict[str, Any], factory: Callable[..., Callback], make_student: Callable[[nn.Module], nn.Module]) -> StagePlan:
    return StagePlan(callbacks=[factory(**settings)])


def _build_early_exit(module: ImageClassifier, settings: dict[str, Any], factory: Callable[..., Callback], make_student: Callable[[nn.Module], nn.Module]) -> StagePlan:
    callback = factory(**settings)
    return StagePlan(callbacks=[callback], keep=lambda: [callback], deploy=lambda net: _early_exit_model(callback, net))


def _early_exit_model(callback: Callback, net: nn.Module) -> nn.Module:
    """The callback's own ``EarlyExitModel`` (its hooks are the ones on ``net``; a second wrapper would run the heads twice)."""
    model = getattr(callback, "model", None)
    if model is None or getattr(model, "backbone", None) is not net:
        raise TypeError(f"{type(callback).__name__}: holds no early-exit model of the current network")
    return model


# name -> (default callback class, builder)
_REGISTRY: dict[str, tuple[str, Callable[..., StagePlan]]] = {
    "distill": ("lightning_fisher.callbacks.KnowledgeDistillation", _build_distill),
    "prune": ("lightning_fisher.callbacks.FisherPruning", _build_prune),
    "low_rank": ("lightning_fisher.callbacks.LowRank", _build_plain),
    "quantize": ("lightning_fisher.callbacks.QuantizationAware", _build_plain),
    "early_exit": ("lightning_fisher.callbacks.EarlyExit", _build_early_exit),
}
STAGES: tuple[str, ...] = tuple(_REGISTRY)


def check_stages(stages: Sequence[str]) -> tuple[str, ...]:
    """Validates a stage list (names from :data:`STAGES`); repeats are allowed."""
    if isinstance(stages, str) or not isinstance(stages, Sequence):
        raise ValueError(f"stages={stages!r}: must be a list of stage names from {STAGES}")
    unknown = [s for s in stages if s not in _REGISTRY]
    if unknown:
        raise ValueError(f"stages={list(stages)!r}: unknown stage(s) {unknown}; must be among {STAGES}")
    return tuple(stages)


# ------------------------------------------------------------- pipeline
def run_pipeline(
    module: ImageClassifier,
    datamodule: L.LightningDataModule,
    stages: Sequence[str],
    make_trainer: TrainerFactory,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    base_epochs: int = 0,
    base_ckpt: str | Path | None = None,
    stage_epochs: int | Mapping[str, int] = 1,
    width_factor: float = 0.5,
    student_factory: StudentFactory = narrow_student,
    scheduler_for_epochs: Callable[[int], Any] | None = None,
    output_dir: str | Path | None = None,
    eval_samples: int = 256,
    callback_classes: Mapping[str, str | type] | None = None,
) -> PipelineResult:
    """Runs ``stages`` in order on ``module``, each as a fine-tuning phase; see the module docstring.

    Args:
        module: the dense model (its ``net`` is trained in the base phase or loaded from ``base_ckpt``).
        datamodule: training, validation and test data (test split: the final accuracy).
        stages: names from :data:`STAGES`, in the order to run them.
        make_trainer: ``(phase_name, max_epochs, callbacks) -> L.Trainer``, called once per phase.
        settings: per-stage keyword arguments of the stage's callback.
        base_epochs: epochs of dense training before the first stage (0: use the weights as they are).
        base_ckpt: a Lightning checkpoint (or a plain state dict) of the dense module to start from,
            instead of the base phase.
        stage_epochs: epochs of each stage's phase, one number or ``{stage: epochs}``.
        width_factor: the ``distill`` student's width relative to the teacher's, in (0, 1].
        student_factory: ``(teacher_net, width_factor) -> student_net`` for ``distill``.
        scheduler_for_epochs: ``epochs -> scheduler factory``, called before each phase so that a
            schedule spans its phase (e.g. cosine with ``T_max=epochs``); ``None`` keeps the module's.
        output_dir: where ``compression.json`` goes (nothing is written when ``None``).
        eval_samples: test images on which bit-operations are measured.
        callback_classes: ``{stage: "module.Class" or class}`` to replace a stage's default callback class.
    """
    stages = check_stages(stages)
    settings = {name: dict(value) for name, value in (settings or {}).items()}
    unknown = sorted(set(settings) - set(STAGES))
    if unknown:
        raise ValueError(f"settings for {unknown}: not stages; must be among {STAGES}")
    if not isinstance(base_epochs, int) or base_epochs < 0:
        raise ValueError(f"base_epochs={base_epochs!r}: must be a non-negative integer")
    if base_epochs and base_ckpt is not None:
        raise ValueError(f"base_epochs={base_epochs}, base_ckpt={str(base_ckpt)!r}: give one, not both")
    epochs_of = _epochs_per_stage(stage_epochs, stages)
    if isinstance(width_factor, bool) or not isinstance(width_factor, (int, float)) or not 0.0 < width_factor <= 1.0:
        raise ValueError(f"width_factor={width_factor!r}: must be in (0, 1]")
    if not isinstance(eval_samples, int) or eval_samples < 1:
        raise ValueError(f"eval_samples={eval_samples!r}: must be a positive integer")
    classes: dict[str, str | type] = {name: default for name, (default, _) in _REGISTRY.items()}
    classes.update(callback_classes or {})

    phases: list[PhaseResult] = []
    if base_ckpt is not None:
        load_weights(module, base_ckpt, what="base_ckpt")
    if base_epochs:
        _set_schedule(module, scheduler_for_epochs, base_epochs)
        phases.append(_fit(make_trainer, "base", base_epochs, [], module, datamodule)[0])
    dense_net = copy.deepcopy(module.net).eval()
    inputs = _eval_inputs(datamodule, eval_samples)

    kept: list[Callback] = []
    deploy: Callable[[nn.Module], nn.Module] | None = None
    trainer: L.Trainer | None = None
    for index, stage in enumerate(stages):
        _, builder = _REGISTRY[stage]
        make_student = functools.partial(_call_student_factory, student_factory, float(width_factor))
        plan = builder(module, dict(settings.get(stage, {})), _callback_class(classes[stage]), make_student)
        if plan.module is not None:
            module, kept, deploy = plan.module, [], None
        name = f"{index + 1}_{stage}"
        _set_schedule(module, scheduler_for_epochs, epochs_of[stage])
        result, trainer = _fit(make_trainer, name, epochs_of[stage], kept + plan.callbacks, module, datamodule)
        phases.append(result)
        if plan.keep is not None:
            kept = kept + [cb for cb in plan.keep() if cb not in kept]
        if plan.deploy is not None:
            deploy = plan.deploy
    for keeper in (cb for cb in kept if isinstance(cb, MaskKeeper)):
        keeper.apply_()

    deployed = deploy(module.net) if deploy is not None else module.net
    deployed.eval()
    dense_accuracy = evaluate_accuracy(dense_net, datamodule)
    accuracy = evaluate_accuracy(deployed, datamodule)
    report = compression_report(deployed, dense_net, inputs.to(_device_of(deployed)), accuracy=accuracy)
    result = PipelineResult(
        stages=stages,
        module=module,
        deployed=deployed,
        report=report,
        accuracy=accuracy,
        dense_accuracy=dense_accuracy,
        phases=phases,
        settings={"base_epochs": base_epochs, "base_ckpt": None if base_ckpt is None else str(base_ckpt),
                  "stage_epochs": epochs_of, "width_factor": width_factor, "stages": settings},
        last_trainer=trainer,
    )
    log.info(
        "pipeline %s: accuracy %.4f (dense %.4f), size %.1fx smaller, %.1fx fewer bit-operations",
        " -> ".join(stages) or "(none)", accuracy, dense_accuracy, report.compression_ratio, report.bit_op_reduction,
    )
    if output_dir is not None:
        path = Path(output_dir) / RECORD_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=2))
    return result


def _fit(
    make_trainer: TrainerFactory, name: str, epochs: int, callbacks: list[Callback], module: ImageClassifier, datamodule: L.LightningDataModule
) -> tuple[PhaseResult, L.Trainer]:
    log.info("pipeline phase %s: %d epoch(s), callbacks %s", name, epochs, [type(cb).__name__ for cb in callbacks])
    trainer = make_trainer(name, epochs, list(callbacks))
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    return PhaseResult(name=name, epochs=epochs, metrics=metrics), trainer


def _call_student_factory(factory: StudentFactory, width_factor: float, net: nn.Module) -> nn.Module:
    return factory(net, width_factor)


def _set_schedule(module: ImageClassifier, scheduler_for_epochs: Callable[[int], Any] | None, epochs: int) -> None:
    if scheduler_for_epochs is not None:
        module.scheduler_factory = scheduler_for_epochs(epochs)


def _epochs_per_stage(stage_epochs: int | Mapping[str, int], stages: Sequence[str]) -> dict[str, int]:
    if isinstance(stage_epochs, Mapping):
        unknown = sorted(set(stage_epochs) - set(STAGES))
        if unknown:
            raise ValueError(f"stage_epochs names {unknown}: not stages; must be among {STAGES}")
        missing = sorted(set(stages) - set(stage_epochs))
        if missing:
            raise ValueError(f"stage_epochs={dict(stage_epochs)!r}: no epochs for {missing}")
        epochs = {name: stage_epochs[name] for name in stages}
    else:
        epochs = {name: stage_epochs for name in stages}
    for name, value in epochs.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"stage_epochs={value!r} for {name!r}: must be a positive integer")
    return epochs


def _same_module(module: ImageClassifier, net: nn.Module) -> ImageClassifier:
    hparams = module.hparams
    return ImageClassifier(
        net,
        num_classes=hparams["num_classes"],
        optimizer=module.optimizer_factory,
        scheduler=module.scheduler_factory,
        label_smoothing=hparams.get("label_smoothing", 0.0),
        top_k=hparams.get("top_k", (1,)),
        decay_norm_and_bias=hparams.get("decay_norm_and_bias", False),
    )


def _device_of(net: nn.Module) -> torch.device:
    return next((p.device for p in net.parameters()), torch.device("cpu"))


def _eval_batches(datamodule: L.LightningDataModule) -> Iterator[tuple[Tensor, Tensor]]:
    transform = getattr(datamodule, "transform_batch", None)
    for images, labels in datamodule.test_dataloader():
        # the data module's own device-side transform (normalisation), augmentation off
        if callable(transform):
            yield transform(images, train=False), labels
        else:
            yield datamodule.on_after_batch_transfer((images, labels), 0)


def _eval_inputs(datamodule: L.LightningDataModule, count: int) -> Tensor:
    chunks, total = [], 0
    for images, _ in _eval_batches(datamodule):
        chunks.append(images)
        total += len(images)
        if total >= count:
            break
    return torch.cat(chunks)[:count]


@torch.no_grad()
def evaluate_accuracy(net: nn.Module, datamodule: L.LightningDataModule) -> float:
    """Top-1 accuracy of ``net`` (in eval mode) on the data module's test split."""
    was_training = net.training
    net.eval()
    device = _device_of(net)
    correct = total = 0
    try:
        for images, labels in _eval_batches(datamodule):
            logits = net(images.to(device))
            correct += int((logits.argmax(dim=1).cpu() == labels.cpu()).sum())
            total += len(labels)
    finally:
        net.train(was_training)
    if not total:
        raise ValueError(f"{type(datamodule).__name__}: the test split is empty")
    return correct / total


# ----------------------------------------------------------- hydra glue
def train_stages(cfg: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Runs ``cfg.stages`` with the settings of ``cfg.compress`` (the path ``lightning_fisher.train`` takes)."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    from lightning_fisher.train import _finish_wandb, _instantiate_entries, _wandb_run_dir

    stages = check_stages(list(cfg.stages))
    compress = cfg.get("compress")
    if compress is None:
        raise ValueError(f"stages={list(stages)}: the pipeline needs the compress config group (add +compress=default)")
    if cfg.get("pruning"):
        raise ValueError(
            "pruning: set together with stages; the prune stage takes its settings from compress.prune, "
            "so leave the pruning group unset (pruning=null)"
        )
    if cfg.get("init_ckpt"):
        raise ValueError(
            f"init_ckpt={cfg.init_ckpt!r}: set together with stages; the pipeline starts from "
            "compress.base_ckpt=<path> (dense weights) instead"
        )
    if cfg.get("ckpt_path"):
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path!r}: set together with stages; the pipeline runs one Trainer per phase "
            "and cannot resume one of them: start it from compress.base_ckpt=<path> instead"
        )
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = instantiate(cfg.module, net=net, num_classes=datamodule.num_classes, optimizer=instantiate(cfg.optimizer), scheduler=scheduler)
    loggers = _instantiate_entries(cfg.get("logger"), "logger")
    output_dir = Path(cfg.paths.output_dir)

    settings: dict[str, dict[str, Any]] = {}
    classes: dict[str, str] = {}
    for name in STAGES:
        entry = compress.get(name)
        if entry is None:
            continue
        entry = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
        if "_target_" in entry:
            classes[name] = entry.pop("_target_")
        settings[name] = entry
    if "prune" in settings and cfg.get("fisher") and settings["prune"].get("criterion", "fisher") == "fisher":
        settings["prune"]["estimator"] = instantiate(cfg.fisher)

    def make_trainer(phase: str, epochs: int, callbacks: list[Callback]) -> L.Trainer:
        extra = _instantiate_entries(cfg.get("callbacks"), "callbacks")
        for callback in extra:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                callback.dirpath = str(Path(callback.dirpath) / phase)
        return instantiate(cfg.trainer, callbacks=extra + callbacks, logger=loggers or False, max_epochs=epochs)

    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        stage_epochs = compress.get("stage_epochs", 1)
        if isinstance(stage_epochs, DictConfig):
            stage_epochs = OmegaConf.to_container(stage_epochs)
        result = run_pipeline(
            module,
            datamodule,
            stages,
            make_trainer,
            settings=settings,
            base_epochs=compress.get("base_epochs", 0),
            base_ckpt=compress.get("base_ckpt"),
            stage_epochs=stage_epochs,
            width_factor=compress.get("width_factor", 0.5),
            student_factory=_config_student_factory(cfg, datamodule),
            scheduler_for_epochs=_config_scheduler(cfg),
            output_dir=output_dir,
            eval_samples=compress.get("eval_samples", 256),
            callback_classes=classes,
        )
        metrics = result.metrics()
        trainer = result.last_trainer
        if trainer is None or trainer.is_global_zero:
            from lightning_fisher.summary import print_summary

            print_summary(metrics, checkpoint_path=str(output_dir / RECORD_FILENAME), wandb_dir=_wandb_run_dir(loggers))
    finally:
        _finish_wandb(loggers)
    return metrics, {"datamodule": datamodule, "model": result.module, "trainer": trainer, "loggers": loggers, "result": result}


def _config_scheduler(cfg: Any) -> Callable[[int], Any] | None:
    """Each phase gets the configured scheduler; one with ``T_max`` spans the phase's epochs."""
    from hydra.utils import instantiate

    if not cfg.get("scheduler"):
        return None
    if "T_max" in cfg.scheduler:
        return lambda epochs: instantiate(cfg.scheduler, T_max=epochs)
    return lambda epochs: instantiate(cfg.scheduler)


def _config_student_factory(cfg: Any, datamodule: Any) -> StudentFactory:
    """Students are the configured model at a narrower ``width`` when the model config has one."""
    from hydra.utils import instantiate

    def factory(net: nn.Module, width_factor: float) -> nn.Module:
        if "width" not in cfg.model:
            return narrow_student(net, width_factor)
        teacher_width = getattr(getattr(net, "bn1", None), "num_features", None) or cfg.model.width
        width = max(1, round(teacher_width * width_factor))
        return instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels, width=width)

    return factory


# ---------------------------------------------------------------- helpers
def _finite_or_str(value: Any) -> Any:
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
