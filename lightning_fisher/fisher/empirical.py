"""The empirical Fisher: the mean of squared per-sample gradients at the true labels."""

from __future__ import annotations

from torch import Tensor

from lightning_fisher.fisher.base import FisherContext, FisherEstimator
from lightning_fisher.fisher.per_sample import Backend, BNMode, check_sampling_args, mean_squared_gradients

__all__ = ["EmpiricalFisher"]


class EmpiricalFisher(FisherEstimator):
    """Diagonal empirical Fisher (1/N) Σ_n g_n², from per-sample gradients at the true labels.

    The classical "square, then sum" estimate (see Kunstner, Balles and Hennig, "Limitations of the
    empirical Fisher approximation for natural gradient descent", NeurIPS 2019, for how it differs from
    the true Fisher). Computed at scoring time from the first ``num_samples`` samples of
    ``context.iter_batches()`` with ``torch.func`` per-sample gradients and ``context.loss_fn`` (label
    smoothing included, if the loss has it). Only ``context.parameters`` are differentiated; parameters,
    buffers and training flags are left as they were. Each data-parallel rank estimates on its own
    samples, so the callback averages the result over ranks (``needs_all_reduce``).

    Args:
        num_samples: samples averaged over (per rank). If the batches run out first, the average is over
            the samples seen, with a warning.
        chunk_size: per-sample gradients computed at once. Memory grows with it (one copy of the
            parameters per row: ~45 MB per row for ResNet18); ``None`` uses whole batches.
        bn_mode: ``"eval"`` (running statistics: true per-sample gradients, the default) or ``"train"``
            (mini-batch statistics, differentiated through, so the mean of the per-sample gradients is
            the training mini-batch gradient; costs about batch-size times more). See
            :mod:`lightning_fisher.fisher.per_sample`.
        backend: ``"vmap"`` (vectorised over ``chunk_size`` rows), ``"loop"`` (one sample at a time, the
            same numbers) or ``"auto"``: vmap on CUDA, the loop on CPU, where it is faster.

    Raises:
        ValueError: ``num_samples < 1``, ``chunk_size < 1``, ``bn_mode`` not one of ``("eval", "train")``,
            or ``backend`` not one of ``("auto", "vmap", "loop")``.

    Example::

        fisher = EmpiricalFisher(num_samples=1024).diagonal(
            FisherContext(model, params, batches=lambda: iter(loader), loss_fn=F.cross_entropy))
    """

    requires_data = True
    needs_all_reduce = True

    def __init__(
        self,
        num_samples: int = 1024,
        chunk_size: int | None = 64,
        bn_mode: BNMode = "eval",
        backend: Backend = "auto",
    ) -> None:
        check_sampling_args(num_samples, chunk_size, bn_mode, backend)
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.bn_mode = bn_mode
        self.backend = backend

    def diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        if context.loss_fn is None:
            raise ValueError("FisherContext.loss_fn=None: EmpiricalFisher needs the training loss")
        return mean_squared_gradients(
            context,
            num_samples=self.num_samples,
            chunk_size=self.chunk_size,
            bn_mode=self.bn_mode,
            loss_fn=context.loss_fn,
            backend=self.backend,
            name=type(self).__name__,
        )

    def __repr__(self) -> str:
        return (
            f"EmpiricalFisher(num_samples={self.num_samples}, chunk_size={self.chunk_size}, "
            f"bn_mode={self.bn_mode!r}, backend={self.backend!r})"
        )
