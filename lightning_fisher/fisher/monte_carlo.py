"""The true Fisher by Monte Carlo: squared gradients at labels sampled from the model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_fisher.fisher.base import FisherContext, FisherEstimator
from lightning_fisher.fisher.per_sample import Backend, BNMode, check_sampling_args, mean_squared_gradients

__all__ = ["MonteCarloFisher"]


class MonteCarloFisher(FisherEstimator):
    """Diagonal true Fisher (1/N) Σ_n E_{ŷ~p(·|x_n)}[ĝ_n²], the expectation estimated by sampling.

    The Fisher information of the model's own categorical distribution p(y|x) = softmax(logits), as
    used by OBD/OBS-style pruning (LeCun et al. 1990; Hassibi and Stork 1993) and WoodFisher (Singh and
    Alistarh, NeurIPS 2020). For every sample, ``labels_per_sample`` labels are drawn from the softmax of
    the model's logits (``torch.multinomial`` with replacement, from a ``torch.Generator``), and the
    squared gradient of the plain cross-entropy at each drawn label is averaged. The loss is plain
    cross-entropy whatever the training loss is (no label smoothing): this is the Fisher of the model's
    distribution, not of the training objective. The model must output class logits ``[batch, classes]``.

    Randomness: call k of :meth:`diagonal` (counting from 0) seeds a fresh generator on the model's device
    with ``seed + k``, so a run is reproducible and a resumed run (the count is in :meth:`state_dict`)
    continues the same sequence. Per-sample gradients, ``chunk_size`` and ``bn_mode`` work as in
    :class:`~lightning_fisher.fisher.empirical.EmpiricalFisher`; each row costs one backward.

    Args:
        num_samples: samples averaged over (per rank).
        labels_per_sample: labels drawn per sample (the cost grows linearly with it).
        chunk_size: rows (sample, label pairs) differentiated at once; ``None`` for whole batches.
        bn_mode: ``"eval"`` (running statistics) or ``"train"`` (mini-batch statistics).
        seed: the base seed of the label sampling.
        backend: ``"vmap"``, ``"loop"`` or ``"auto"`` (vmap on CUDA, the loop elsewhere), as in
            :class:`~lightning_fisher.fisher.empirical.EmpiricalFisher`.

    Raises:
        ValueError: ``num_samples < 1``, ``labels_per_sample < 1``, ``chunk_size < 1``, a negative
            ``seed``, ``bn_mode`` not one of ``("eval", "train")`` or ``backend`` not one of
            ``("auto", "vmap", "loop")``.

    Example::

        fisher = MonteCarloFisher(num_samples=1024, seed=0).diagonal(
            FisherContext(model, params, batches=lambda: iter(loader)))
    """

    requires_data = True
    needs_all_reduce = True

    def __init__(
        self,
        num_samples: int = 1024,
        labels_per_sample: int = 1,
        chunk_size: int | None = 64,
        bn_mode: BNMode = "eval",
        seed: int = 0,
        backend: Backend = "auto",
    ) -> None:
        check_sampling_args(num_samples, chunk_size, bn_mode, backend)
        if isinstance(labels_per_sample, bool) or not isinstance(labels_per_sample, int) or labels_per_sample < 1:
            raise ValueError(f"labels_per_sample={labels_per_sample!r}: must be an integer >= 1")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r}: must be a non-negative integer")
        self.num_samples = num_samples
        self.labels_per_sample = labels_per_sample
        self.chunk_size = chunk_size
        self.bn_mode = bn_mode
        self.seed = seed
        self.backend = backend
        self.calls = 0

    def diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        device = next(iter(context.parameters.values())).device if context.parameters else torch.device("cpu")
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed + self.calls)
        self.calls += 1

        def sample_labels(logits: Tensor) -> Tensor:
            probs = torch.softmax(logits.float(), dim=-1)
            return torch.multinomial(probs, self.labels_per_sample, replacement=True, generator=generator)

        return mean_squared_gradients(
            context,
            num_samples=self.num_samples,
            chunk_size=self.chunk_size,
            bn_mode=self.bn_mode,
            loss_fn=F.cross_entropy,
            label_sampler=sample_labels,
            backend=self.backend,
            name=type(self).__name__,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unexpected = sorted(set(state) - {"version", "calls"})
        if unexpected:
            raise ValueError(f"MonteCarloFisher.load_state_dict: unexpected keys {unexpected}")
        self.calls = int(state.get("calls", self.calls))

    def __repr__(self) -> str:
        return (
            f"MonteCarloFisher(num_samples={self.num_samples}, labels_per_sample={self.labels_per_sample}, "
            f"chunk_size={self.chunk_size}, bn_mode={self.bn_mode!r}, seed={self.seed}, backend={self.backend!r})"
        )
