"""FishLeg's layer forms: Qv and diagQ against the materialised Q, PSD, layer coverage, parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_fisher.fisher.fishleg import forms as forms_module
from lightning_fisher.fisher.fishleg.forms import (
    CONV_FORMS,
    DiagonalForm,
    KroneckerForm,
    LayerForm,
    ThreeFactorConvForm,
    forms_for,
)
from lightning_fisher.models.resnet import ResNet18

CASES = [
    (KroneckerForm, [(3, 4), (3,)]),  # Linear with bias
    (KroneckerForm, [(3, 4)]),  # Linear without bias
    (KroneckerForm, [(3, 2, 2, 2), (3,)]),  # Conv2d, two-factor
    (ThreeFactorConvForm, [(3, 2, 2, 2), (3,)]),  # Conv2d, three-factor, with bias
    (ThreeFactorConvForm, [(4, 3, 1, 3)]),  # Conv2d, three-factor, no bias, non-square kernel
    (DiagonalForm, [(4,), (4,)]),  # BatchNorm / LayerNorm affine
]


def _random_form(cls: type[LayerForm], shapes: list[tuple[int, ...]], seed: int = 0) -> LayerForm:
    form = cls([f"layer.p{i}" for i in range(len(shapes))], shapes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in form.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return form.double()


def _split(vector: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    out, offset = [], 0
    for shape in shapes:
        out.append(vector[offset : offset + shape.numel()].reshape(shape))
        offset += shape.numel()
    return out


@pytest.mark.parametrize(("cls", "shapes"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_qv_and_diagq_equal_the_materialised_q(cls, shapes):
    form = _random_form(cls, shapes)
    q = form.materialise().detach()
    n = sum(torch.Size(s).numel() for s in shapes)
    assert q.shape == (n, n)
    torch.testing.assert_close(q, q.T)
    assert torch.linalg.eigvalsh(q).min() > -1e-10 * q.abs().max()  # PSD by construction
    vector = torch.randn(n, dtype=torch.float64)
    product = torch.cat([p.flatten() for p in form.Qv(_split(vector, form.shapes))]).detach()
    torch.testing.assert_close(product, q @ vector)
    diag = torch.cat([d.flatten() for d in form.diagQ()]).detach()
    torch.testing.assert_close(diag, q.diagonal())


@pytest.mark.parametrize(("cls", "shapes"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_correlation_inflation_is_the_diagonal_of_q_times_the_diagonal_of_its_inverse(cls, shapes):
    form = _random_form(cls, shapes)
    q = form.materialise().detach()
    expected = q.diagonal() * torch.linalg.inv(q).diagonal()  # the scales D cancel
    got = torch.cat([r.flatten() for r in form.correlation_inflation()])
    torch.testing.assert_close(got, expected)
    assert bool((got >= 1 - 1e-9).all())
    if cls is not DiagonalForm:
        assert float(got.max()) > 1.01  # random factors correlate the coordinates
    with torch.no_grad():
        form.init_diagonal_([torch.rand(s, dtype=torch.float64) + 0.5 for s in form.shapes])
    torch.testing.assert_close(torch.cat([r.flatten() for r in form.correlation_inflation()]), torch.ones_like(got))


def test_correlation_inflation_rejects_a_singular_factor():
    form = KroneckerForm(["w"], [(3, 4)])
    with torch.no_grad():
        form.left[0].zero_()
    with pytest.raises(ValueError, match="singular"):
        form.correlation_inflation()


@pytest.mark.parametrize(("cls", "shapes"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_coupled_names_are_the_blocks_q_links_to_the_weight(cls, shapes):
    # what OBS must move besides the given weight: exactly the parameters whose block of Q·[v, 0] can be
    # non-zero (for a random form, a non-zero off-diagonal block of the materialised Q)
    form = _random_form(cls, shapes)
    q = form.materialise().detach()
    n = torch.Size(shapes[0]).numel()
    linked = [name for name, block in zip(form.names[1:], _split_rows(q[n:, :n], form.shapes[1:])) if block.abs().max() > 0]
    assert form.coupled_names({"layer.p0"}) == linked
    assert form.coupled_names({"other.weight"}) == []  # a form couples nothing to names it does not cover
    assert form.coupled_names(form.names) == []  # everything given: nothing further to add
    expected = ["layer.p1"] if cls is KroneckerForm and len(shapes) == 2 else []
    assert linked == expected


def _split_rows(matrix: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    out, offset = [], 0
    for shape in shapes:
        out.append(matrix[offset : offset + shape.numel()])
        offset += shape.numel()
    return out


@pytest.mark.parametrize(("cls", "shapes"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_init_diagonal_gives_exactly_that_diagonal(cls, shapes):
    form = _random_form(cls, shapes)
    target = [torch.rand(s, dtype=torch.float64) + 0.1 for s in shapes]
    form.init_diagonal_(target)
    expected = torch.diag(torch.cat([t.flatten() for t in target]))
    torch.testing.assert_close(form.materialise().detach(), expected)


def test_num_parameters_by_form():
    # out² + n² + D: 3² + 5² + 15 for a 3×4 Linear with bias
    assert KroneckerForm(["w", "b"], [(3, 4), (3,)]).num_parameters() == 9 + 25 + 15
    # out² + in² + k² + D(weight) + D(bias)
    assert ThreeFactorConvForm(["w", "b"], [(8, 4, 3, 3), (8,)]).num_parameters() == 64 + 16 + 81 + 288 + 8
    assert DiagonalForm(["w", "b"], [(5,), (5,)]).num_parameters() == 10


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.ln = nn.LayerNorm(4)
        self.conv1d = nn.Conv1d(2, 3, 3)
        self.fc = nn.Linear(4, 2, bias=False)
        self.free = nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize("conv_form", CONV_FORMS)
def test_forms_for_picks_one_form_per_layer_and_lists_the_fallbacks(conv_form):
    model = Mixed()
    names = ["conv.weight", "bn.weight", "ln.bias", "conv1d.weight", "fc.weight", "free"]
    forms, fallback = forms_for(model, names, conv_form)
    by_first = {f.names[0]: f for f in forms}
    conv_cls = ThreeFactorConvForm if conv_form == "three_factor" else KroneckerForm
    assert type(by_first["conv.weight"]) is conv_cls and by_first["conv.weight"].names == ["conv.weight", "conv.bias"]
    assert type(by_first["bn.weight"]) is DiagonalForm and by_first["bn.weight"].names == ["bn.weight", "bn.bias"]
    assert by_first["ln.weight"].names == ["ln.weight", "ln.bias"]
    assert type(by_first["fc.weight"]) is KroneckerForm and by_first["fc.weight"].names == ["fc.weight"]
    assert type(by_first["conv1d.weight"]) is DiagonalForm and by_first["conv1d.weight"].names == ["conv1d.weight"]
    assert fallback == ["conv1d", "<root>"]


def test_forms_for_rejects_bad_input():
    with pytest.raises(ValueError, match=r"conv_form='four_factor': must be one of"):
        forms_for(Mixed(), ["conv.weight"], "four_factor")
    with pytest.raises(ValueError, match=r"parameters \['nope.weight'\]: not parameters of the model"):
        forms_for(Mixed(), ["nope.weight"])


def test_every_name_in_all_resolves():
    for name in forms_module.__all__:
        assert hasattr(forms_module, name), name


def _resnet18_count(conv_form: str) -> int:
    model = ResNet18(num_classes=10, width=64, in_channels=3)
    names = [f"{m}.weight" for m, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    forms, fallback = forms_for(model, names, conv_form)
    assert fallback == []
    return sum(f.num_parameters() for f in forms)


def test_resnet18_memory_of_both_conv_forms():
    # Measured with num_parameters on ResNet18 (width 64, CIFAR, every Conv2d/Linear block with its bias):
    # two_factor 105,157,128 λ entries (93,992,766 in the factors), three_factor 14,390,428 (3,226,066 in the
    # factors); both include the per-weight D, 11,164,362 entries (one per weight and bias entry).
    two, three = _resnet18_count("two_factor"), _resnet18_count("three_factor")
    weights = sum(p.numel() for n, p in ResNet18(num_classes=10, width=64, in_channels=3).named_parameters())
    assert two == 105_157_128
    assert three == 14_390_428
    assert three < two / 7 and weights < three
