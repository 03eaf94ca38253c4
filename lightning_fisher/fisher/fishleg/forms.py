"""FishLeg's per-layer forms of the inverse Fisher Q(λ) ≈ (F + γI)⁻¹: PSD by construction.

Every form covers the parameters of one layer (``weight`` and, where present, ``bias``) and holds its
λ as ``nn.Parameter``s, so ``state_dict`` and an Adam optimizer over λ work as for any module. Vectors
are given and returned per parameter, shaped like the parameter; the dense matrix of
:meth:`LayerForm.materialise` is ordered as ``cat([p.flatten() for p in params])`` (tests only).

Forms (Garcia et al., ICLR 2023, "Fisher-Legendre (FishLeg) optimization of deep neural networks"):

- :class:`KroneckerForm` (Linear, and Conv2d ``conv_form="two_factor"``): the weight as a matrix
  W̃ = [W | b] of shape out × (in·kh·kw + 1) (no bias column without a bias);
  Q = D (LLᵀ ⊗ RᵀR) D, i.e. Q·V = D ⊙ (LLᵀ (D ⊙ V) RᵀR), with D a per-entry diagonal rescaling.
- :class:`ThreeFactorConvForm` (Conv2d ``conv_form="three_factor"``): the weight as a tensor
  out × in × (kh·kw), Q = D (LLᵀ ⊗ R_inᵀR_in ⊗ R_kᵀR_k) D; the bias (not a Kronecker factor of that
  tensor) gets its own diagonal D_b².
- :class:`DiagonalForm` (BatchNorm, LayerNorm, and the fallback for any other layer): Q = diag(d²).

Only the Kronecker form couples a layer's weight and bias (:meth:`LayerForm.coupled_names`): there Q·v
for a v that is zero on the bias still has a bias block, which OBS compensation applies to the bias.

diag(Q) has a closed form: D² times the Kronecker product of the factors' diagonals, each the squared
row sums of L (diag LLᵀ) or squared column sums of R (diag RᵀR). Initialising the factors at the
identity and D at √q gives Q = diag(q) exactly (FishLeg Surgeon's Q₀ = diag(1/(E[g²] + γ))).

Per-entry λ (D, d) are aligned with the parameter entries (:meth:`LayerForm.coordinate_scales`): masked
refinement after pruning freezes the entries of pruned weights.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Collection, Sequence

import torch
from torch import Tensor, nn

__all__ = ["CONV_FORMS", "DiagonalForm", "KroneckerForm", "LayerForm", "ThreeFactorConvForm", "forms_for"]


class LayerForm(nn.Module, abc.ABC):
    """One layer's block of Q(λ): ``Qv``, closed-form ``diagQ``, ``num_parameters``, ``materialise``.

    Args:
        names: the FQNs of the parameters this block covers, in order (``weight`` first).
        shapes: their shapes.
    """

    kind: str = "layer"

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(names) != len(shapes) or not names:
            raise ValueError(f"names={list(names)!r}, shapes={list(shapes)!r}: need one shape per name, at least one")
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        # D (or d): one entry per parameter entry, ones until initialised.
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(s)) for s in self.shapes])

    @abc.abstractmethod
    def Qv(self, vectors: Sequence[Tensor]) -> list[Tensor]:  # noqa: N802 - FishLeg's notation
        """Q·v for one vector per covered parameter (shaped like it); differentiable in λ."""

    @abc.abstractmethod
    def diagQ(self) -> list[Tensor]:  # noqa: N802 - FishLeg's notation
        """diag(Q), one tensor per covered parameter, from the closed form (no products)."""

    @abc.abstractmethod
    def materialise(self) -> Tensor:
        """Q as a dense ``[n, n]`` matrix, ordered as ``cat(p.flatten())`` (small layers, tests)."""

    def _reset_factors_(self) -> None:  # noqa: B027 - forms without factors have nothing to reset
        """Set every Kronecker factor to the identity."""

    def correlation_inflation(self) -> list[Tensor]:
        """diag(K)·diag(K⁻¹) per entry (≥ 1), K = Q with the scales D removed; ones for a diagonal block.

        It equals Q_qq·[Q⁻¹]_qq whatever D is: how much larger Q's diagonal is than the reciprocal of the
        diagonal of the Fisher Q implies, because of the correlations the factors hold (1 where there are none).
        """
        return [torch.ones_like(scale.detach()) for scale in self.scales]

    def coupled_names(self, given: Collection[str]) -> list[str]:
        """Covered parameters outside ``given`` whose block of Q·v can be non-zero when v is zero on them.

        These are the parameters an OBS step on ``given`` also moves. None by default: the form's
        blocks are independent (diagonal forms; the three-factor conv's diagonal bias).
        """
        return []

    def num_parameters(self) -> int:
        """Entries of λ (the memory Q costs, before the optimizer state of λ)."""
        return sum(p.numel() for p in self.parameters())

    def coordinate_scales(self) -> list[nn.Parameter]:
        """λ entries aligned one-to-one with the covered parameters' entries (D or d)."""
        return list(self.scales)

    @torch.no_grad()
    def init_diagonal_(self, inverse_diagonal: Sequence[Tensor]) -> None:
        """Set Q = diag(q): identity factors, D = √q (``q`` positive, one tensor per parameter)."""
        for scale, q in zip(self.scales, inverse_diagonal, strict=True):
            if q.shape != scale.shape:
                raise ValueError(f"init_diagonal_: shape {tuple(q.shape)} for a parameter of shape {tuple(scale.shape)}")
            scale.copy_(q.to(scale).clamp_min(0).sqrt())
        self._reset_factors_()

    def extra_repr(self) -> str:
        return f"names={self.names}, shapes={[tuple(s) for s in self.shapes]}"


def _identity(n: int) -> nn.Parameter:
    return nn.Parameter(torch.eye(n))


def _inflation(gram: Tensor) -> Tensor:
    """diag(G)·diag(G⁻¹) of a symmetric positive-definite factor G, computed in float64."""
    g = gram.detach().double()
    inverse, info = torch.linalg.inv_ex(g)
    out = g.diagonal() * inverse.diagonal()
    if int(info) != 0 or not bool(torch.isfinite(out).all()) or bool((out <= 0).any()):
        raise ValueError("FishLeg: a Kronecker factor is singular, its inverse has no finite positive diagonal")
    return out.to(gram.dtype)


class KroneckerForm(LayerForm):
    """Q = D (LLᵀ ⊗ RᵀR) D over the layer matrix [W | b], out × (in·kh·kw [+ 1]).

    FishLeg's dense-layer form (Garcia et al., ICLR 2023), with the conv weight flattened per output
    channel (the two-factor conv form). Parameters: out² + n² + one D entry per weight/bias entry.
    """

    kind = "kronecker"

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> None:
        super().__init__(names, shapes)
        if len(self.shapes) > 2 or (len(self.shapes) == 2 and self.shapes[1] != self.shapes[0][:1]):
            raise ValueError(f"shapes={[tuple(s) for s in self.shapes]}: expected a weight [out, ...] and an optional bias [out]")
        self.out = self.shapes[0][0]
        self.fan_in = math.prod(self.shapes[0][1:])
        self.has_bias = len(self.shapes) == 2
        self.cols = self.fan_in + int(self.has_bias)
        self.left = _identity(self.out)  # L: A = LLᵀ over output units
        self.right = _identity(self.cols)  # R: B = RᵀR over inputs (+ bias column)

    def _reset_factors_(self) -> None:
        self.left.copy_(torch.eye(self.out))
        self.right.copy_(torch.eye(self.cols))

    def coupled_names(self, given: Collection[str]) -> list[str]:
        """The bias when only the weight is given (and vice versa): [W | b] share one Kronecker block."""
        if not any(name in given for name in self.names):
            return []
        return [name for name in self.names if name not in given]

    def _to_matrix(self, vectors: Sequence[Tensor]) -> Tensor:
        columns = [vectors[0].reshape(self.out, self.fan_in)]
        if self.has_bias:
            columns.append(vectors[1].reshape(self.out, 1))
        return torch.cat(columns, dim=1)

    def _from_matrix(self, matrix: Tensor) -> list[Tensor]:
        out = [matrix[:, : self.fan_in].reshape(self.shapes[0])]
        if self.has_bias:
            out.append(matrix[:, self.fan_in])
        return out

    def Qv(self, vectors: Sequence[Tensor]) -> list[Tensor]:  # noqa: N802
        scaled = self._to_matrix([v * d for v, d in zip(vectors, self.scales, strict=True)])
        product = self.left @ (self.left.T @ scaled @ self.right.T) @ self.right
        return [p * d for p, d in zip(self._from_matrix(product), self.scales, strict=True)]

    def diagQ(self) -> list[Tensor]:  # noqa: N802
        rows = self.left.square().sum(1)  # diag(LLᵀ)
        cols = self.right.square().sum(0)  # diag(RᵀR)
        kron = self._from_matrix(rows[:, None] * cols[None, :])
        return [k * d.square() for k, d in zip(kron, self.scales, strict=True)]

    def correlation_inflation(self) -> list[Tensor]:
        rows = _inflation(self.left @ self.left.T)
        cols = _inflation(self.right.T @ self.right)
        return self._from_matrix(rows[:, None] * cols[None, :])

    def materialise(self) -> Tensor:
        a = self.left @ self.left.T
        b = self.right.T @ self.right
        kron = torch.kron(a, b)  # row-major vec of the out × cols matrix: vec(A V B) = (A ⊗ Bᵀ) vec V
        index = torch.arange(self.out * self.cols).reshape(self.out, self.cols)
        order = torch.cat([p.flatten() for p in self._from_matrix(index)])
        d = torch.cat([s.flatten() for s in self.scales])
        return d[:, None] * kron[order][:, order] * d[None, :]


class ThreeFactorConvForm(LayerForm):
    """Q = D (LLᵀ ⊗ R_inᵀR_in ⊗ R_kᵀR_k) D over the conv weight out × in × (kh·kw); bias diagonal.

    FishLeg's memory-light convolution form. Parameters: out² + in² + (kh·kw)² + one D entry per
    weight/bias entry.
    """

    kind = "three_factor"

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> None:
        super().__init__(names, shapes)
        weight = self.shapes[0]
        if len(weight) != 4 or len(self.shapes) > 2 or (len(self.shapes) == 2 and self.shapes[1] != weight[:1]):
            raise ValueError(f"shapes={[tuple(s) for s in self.shapes]}: expected a conv weight [out, in, kh, kw] and an optional bias")
        self.out, self.inp = weight[0], weight[1]
        self.kernel = weight[2] * weight[3]
        self.left = _identity(self.out)
        self.right_in = _identity(self.inp)
        self.right_k = _identity(self.kernel)

    def _reset_factors_(self) -> None:
        self.left.copy_(torch.eye(self.out))
        self.right_in.copy_(torch.eye(self.inp))
        self.right_k.copy_(torch.eye(self.kernel))

    def Qv(self, vectors: Sequence[Tensor]) -> list[Tensor]:  # noqa: N802
        a = self.left @ self.left.T
        b = self.right_in.T @ self.right_in
        c = self.right_k.T @ self.right_k
        # (A ⊗ B ⊗ C)·v as three matmuls, one mode at a time: the order torch.einsum("oa,aik,ij,kl->ojl")
        # takes, with far fewer kernel launches (an update is launch-bound on a GPU)
        v = (vectors[0] * self.scales[0]).reshape(self.out, self.inp * self.kernel)
        y = (a @ v).reshape(self.out, self.inp, self.kernel)
        y = y.transpose(1, 2) @ b  # out × kernel × in
        y = y.transpose(1, 2) @ c  # out × in × kernel
        out = [y.reshape(self.shapes[0]) * self.scales[0]]
        if len(vectors) > 1:
            out.append(vectors[1] * self.scales[1].square())
        return out

    def diagQ(self) -> list[Tensor]:  # noqa: N802
        a = self.left.square().sum(1)
        b = self.right_in.square().sum(0)
        c = self.right_k.square().sum(0)
        kron = (a[:, None, None] * b[None, :, None] * c[None, None, :]).reshape(self.shapes[0])
        out = [kron * self.scales[0].square()]
        if len(self.scales) > 1:
            out.append(self.scales[1].square())
        return out

    def correlation_inflation(self) -> list[Tensor]:
        a = _inflation(self.left @ self.left.T)
        b = _inflation(self.right_in.T @ self.right_in)
        c = _inflation(self.right_k.T @ self.right_k)
        out = [(a[:, None, None] * b[None, :, None] * c[None, None, :]).reshape(self.shapes[0])]
        if len(self.shapes) > 1:
            out.append(torch.ones_like(self.scales[1].detach()))
        return out

    def materialise(self) -> Tensor:
        a = self.left @ self.left.T
        b = self.right_in.T @ self.right_in
        c = self.right_k.T @ self.right_k
        d = self.scales[0].flatten()
        weight_block = d[:, None] * torch.kron(a, torch.kron(b, c)) * d[None, :]
        if len(self.scales) == 1:
            return weight_block
        return torch.block_diag(weight_block, torch.diag(self.scales[1].square()))


class DiagonalForm(LayerForm):
    """Q = diag(d²): BatchNorm/LayerNorm affine parameters, and the fallback for other layer types."""

    kind = "diagonal"

    def Qv(self, vectors: Sequence[Tensor]) -> list[Tensor]:  # noqa: N802
        return [v * d.square() for v, d in zip(vectors, self.scales, strict=True)]

    def diagQ(self) -> list[Tensor]:  # noqa: N802
        return [d.square() for d in self.scales]

    def materialise(self) -> Tensor:
        return torch.diag(torch.cat([d.flatten().square() for d in self.scales]))


CONV_FORMS: tuple[str, ...] = ("two_factor", "three_factor")
"""Accepted ``conv_form`` values."""

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _clean(name: str) -> str:
    # torch.compile's ``_orig_mod`` segments, dropped as the pruner's parameter selection drops them
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def forms_for(model: nn.Module, names: Sequence[str], conv_form: str = "three_factor") -> tuple[list[LayerForm], list[str]]:
    """One form per layer owning a parameter in ``names`` (FQNs, ``_orig_mod`` segments dropped).

    A Linear/Conv2d/BatchNorm/LayerNorm block covers the layer's ``weight`` and ``bias`` (when they
    exist), whichever of them is named. Parameters of any other module type get a :class:`DiagonalForm`
    each; their modules are returned as the second element, for the caller's warning.

    Raises:
        ValueError: ``conv_form`` unknown, or a name that is not a parameter of ``model``.
    """
    if conv_form not in CONV_FORMS:
        raise ValueError(f"conv_form={conv_form!r}: must be one of {CONV_FORMS}")
    modules = {_clean(fqn): module for fqn, module in model.named_modules()}
    params = {_clean(fqn): p for fqn, p in model.named_parameters()}
    unknown = sorted(set(names) - set(params))
    if unknown:
        raise ValueError(f"parameters {unknown}: not parameters of the model")
    owners: dict[str, list[str]] = {}
    for name in names:
        owner, _, _ = name.rpartition(".")
        owners.setdefault(owner, []).append(name)
    forms: list[LayerForm] = []
    fallback: list[str] = []
    for owner, owned in owners.items():
        module = modules.get(owner)
        prefix = f"{owner}." if owner else ""
        layer = [f"{prefix}{attr}" for attr in ("weight", "bias") if isinstance(getattr(module, attr, None), nn.Parameter)]
        structured = isinstance(module, (nn.Linear, nn.Conv2d, *_NORMS)) and all(n in layer for n in owned)
        if not structured:
            fallback.append(owner or "<root>")
            forms.extend(DiagonalForm([n], [params[n].shape]) for n in owned)
            continue
        shapes = [params[n].shape for n in layer]
        if isinstance(module, _NORMS):
            forms.append(DiagonalForm(layer, shapes))
        elif isinstance(module, nn.Conv2d) and conv_form == "three_factor":
            forms.append(ThreeFactorConvForm(layer, shapes))
        else:
            forms.append(KroneckerForm(layer, shapes))
    return forms, fallback
