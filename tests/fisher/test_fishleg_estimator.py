"""FishLegFisher on problems small enough to form the exact damped Fisher (CPU, a few seconds)."""

from __future__ import annotations

import copy
import dataclasses
import io
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fisher.fisher import EmpiricalFisher, FisherContext, FisherEstimator, FishLegFisher
from lightning_fisher.fisher.fishleg import estimator as estimator_module
from lightning_fisher.fisher.fishleg.products import fisher_vector_product
from lightning_fisher.fisher.squisher import Squisher
from lightning_fisher.profiling import HostSyncCounter
from lightning_fisher.pruning.patterns import to_reduction_layout
from lightning_fisher.pruning.pruner import Pruner
from lightning_fisher.pruning.scores import score_obs
from lightning_fisher.pruning.surgeon import obs_compensate_

N, D, C = 512, 4, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _logistic() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, C))
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    return model, torch.randn(N, D)


def _context(model: nn.Module, x: Tensor, y: Tensor | None = None, batch: int = 64, **kwargs) -> FisherContext:
    y = torch.zeros(len(x), dtype=torch.long) if y is None else y
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    return FisherContext(
        model, params, batches=lambda: [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)], **kwargs
    )


def _exact_fisher(model: nn.Module, x: Tensor) -> Tensor:
    """(1/N) Σ (diag p − ppᵀ) ⊗ x̃x̃ᵀ for logistic regression, ordered as [W.flatten(), b]."""
    p = torch.softmax(model(x), -1).detach().double()
    xt = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    fisher = sum(torch.kron(torch.diag(p[n]) - torch.outer(p[n], p[n]), torch.outer(xt[n], xt[n])) for n in range(len(x)))
    fisher = fisher / len(x)
    index = torch.arange(C * (D + 1)).reshape(C, D + 1)
    order = torch.cat([index[:, :D].flatten(), index[:, D]])
    return fisher[order][:, order]


# ----------------------------------------------------------------------------- products


def test_finite_difference_product_equals_the_exact_fisher_product():
    model, x = _logistic()
    # for a linear model the sampled-label loss Hessian is the Fisher for any label draw: exact up to O(ε²)
    fisher = _exact_fisher(model, x)
    params = dict(model.named_parameters())
    v = {n: torch.randn(p.shape) for n, p in params.items()}
    product = fisher_vector_product(model, params, x, v, "finite_difference", torch.Generator().manual_seed(0))
    got = torch.cat([product["0.weight"].flatten(), product["0.bias"]]).double()
    expected = fisher @ torch.cat([v["0.weight"].flatten(), v["0.bias"]]).double()
    # measured relative error 2.3e-4 (float32 gradients); asserted 2e-3
    assert (got - expected).norm() / expected.norm() < 2e-3


def test_rank1_product_averages_to_the_exact_fisher_product():
    model, x = _logistic()
    x = x[:32]
    fisher = _exact_fisher(model, x)
    params = dict(model.named_parameters())
    v = {n: torch.randn(p.shape) for n, p in params.items()}
    generator = torch.Generator().manual_seed(0)
    draws = 2000
    total = None
    for _ in range(draws):
        product = fisher_vector_product(model, params, x, v, "rank1", generator)
        flat = torch.cat([product["0.weight"].flatten(), product["0.bias"]]).double()
        total = flat if total is None else total + flat
    expected = fisher @ torch.cat([v["0.weight"].flatten(), v["0.bias"]]).double()
    # unbiased but noisy: measured relative error 0.031 over 2000 draws; asserted 0.1
    assert (total / draws - expected).norm() / expected.norm() < 0.1


def _mlp_fisher(model: nn.Module, x: Tensor) -> Tensor:
    """(1/N) Σ J_iᵀ (diag p_i − p_i p_iᵀ) J_i from per-input Jacobians, ordered as cat(p.flatten())."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logits(values: dict[str, Tensor], xi: Tensor) -> Tensor:
        return torch.func.functional_call(model, values, (xi[None],))[0]

    fisher = 0.0
    for xi in x:
        jacobian = torch.func.jacrev(logits)(params, xi)
        j = torch.cat([jacobian[n].reshape(C, -1) for n in params], 1).double()
        p = torch.softmax(model(xi[None])[0], -1).detach().double()
        fisher = fisher + j.T @ (torch.diag(p) - torch.outer(p, p)) @ j
    return fisher / len(x)


def _tanh_mlp() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)), torch.randn(64, D)


def _flat(values: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.flatten() for v in values.values()]).double()


def test_ggn_product_is_the_exact_fisher_product_of_a_nonlinear_model():
    model, x = _tanh_mlp()
    params = dict(model.named_parameters())
    v = {n: torch.randn(p.shape) for n, p in params.items()}
    expected = _mlp_fisher(model, x) @ _flat(v)
    got = _flat(fisher_vector_product(model, params, x, v, "ggn"))
    # measured relative error 1.7e-7 (float32); asserted 1e-5
    assert (got - expected).norm() / expected.norm() < 1e-5
    # on logistic regression too, where it is the Fisher of _exact_fisher
    model, x = _logistic()
    params = dict(model.named_parameters())
    v = {n: torch.randn(p.shape) for n, p in params.items()}
    expected = _exact_fisher(model, x) @ _flat(v)  # both ordered weight, then bias
    got = _flat(fisher_vector_product(model, params, x, v, "ggn"))
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_sampled_label_products_average_to_the_ggn_product_where_one_draw_is_indefinite():
    model, x = _tanh_mlp()
    x = x[:8]
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
    exact = _flat(fisher_vector_product(model, params, x, v, "ggn"))
    draws = [_flat(fisher_vector_product(model, params, x, v, "finite_difference", generator)) for _ in range(2000)]
    # measured relative error 0.046 over 2000 draws; asserted 0.1
    assert (torch.stack(draws).mean(0) - exact).norm() / exact.norm() < 0.1
    # a single draw is the sampled-label Hessian: vᵀHv is negative on 16% of the draws (measured), vᵀFv > 0
    curvatures = torch.stack([(d * _flat(v)).sum() for d in draws])
    assert float(exact @ _flat(v)) > 0
    assert float(curvatures.min()) < 0
    # the GGN is positive semi-definite: no random direction has negative curvature
    for _ in range(20):
        w = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
        assert float(_flat(fisher_vector_product(model, params, x, w, "ggn")) @ _flat(w)) >= 0


# ------------------------------------------------------------------------ learning Q


def test_learned_q_approaches_the_damped_inverse_fisher():
    model, x = _logistic()
    gamma = 0.1
    target = torch.linalg.inv(_exact_fisher(model, x) + gamma * torch.eye(C * (D + 1), dtype=torch.float64))
    estimator = FishLegFisher(damping=gamma, lr=3e-3, update_every=None, init="gradients")
    context = _context(model, x)
    estimator.build(context)
    (form,) = estimator.forms

    def error() -> float:
        return float((form.materialise().detach().double() - target).norm() / target.norm())

    initial = error()
    losses = estimator.pretrain(context, 300)
    learned = error()
    # measured: Q₀ = diag(1/(B·ḡ² + γ)) 0.58, after 300 updates 0.11-0.13 (seeds 0-2); the Kronecker form
    # cannot represent F_γ⁻¹ exactly (about 0.11 stays); asserted 0.2 and a 3× improvement
    assert initial > 0.5
    assert learned < 0.2 and learned < initial / 3
    assert sum(losses[-50:]) < sum(losses[:50])  # the auxiliary loss went down


def _exact_auxiliary_loss(model: nn.Module, x: Tensor, q: Tensor, gamma: float, seed: int, batches: int, batch: int) -> float:
    """A(Q; u) per coordinate at the exact batch Fisher, on ``auxiliary_loss``'s documented draws: batch i's
    probe from the generator seeded 2**62 + seed·1_000_003 + i, drawn per parameter (weight, then bias)."""
    values = []
    for i in range(batches):
        generator = torch.Generator().manual_seed(2**62 + seed * 1_000_003 + i)
        u = torch.cat([torch.randn(C, D, generator=generator).flatten(), torch.randn(C, generator=generator)]).double()
        fisher = _exact_fisher(model, x[i * batch : (i + 1) * batch]) + gamma * torch.eye(C * (D + 1), dtype=torch.float64)
        w = q @ u
        values.append(float(0.5 * w @ fisher @ w - u @ w) / u.numel())
    return sum(values) / batches


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_q_approaches_the_damped_inverse_fisher_of_a_nonlinear_model_with_ggn_products(seed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C))
    x, y = torch.randn(N, D), torch.randint(0, C, (N,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    gamma = 0.1
    fisher = _mlp_fisher(model, x)
    target = torch.linalg.inv(fisher + gamma * torch.eye(len(fisher), dtype=torch.float64))
    estimator = FishLegFisher(damping=gamma, update_every=None, init="gradients", fvp="ggn", seed=seed)
    context = _context(model, x, y)
    context.parameters.update(model.named_parameters())  # both layers, biases too: Q covers every parameter
    estimator.build(context)

    def error() -> float:
        q = torch.block_diag(*[form.materialise().detach().double() for form in estimator.forms])
        return float((q - target).norm() / target.norm())

    initial, initial_aux = error(), estimator.auxiliary_loss(context)
    estimator.pretrain(context, 300)
    # measured (seed 0): relative error 0.49 -> 0.37, A -2.14 -> -3.28 (Q is block-diagonal over the two
    # layers and F_γ⁻¹ is not, so part of the error stays); asserted 0.42 and 0.5 below the start
    assert error() < 0.42 < initial
    assert estimator.auxiliary_loss(context) < initial_aux - 0.5


def test_auxiliary_loss_is_a_on_fixed_probes_at_the_exact_fisher_and_changes_nothing():
    model, x = _logistic()
    gamma, batch = 0.1, 64
    estimator = FishLegFisher(damping=gamma, update_every=None, init="gradients")
    context = _context(model, x, batch=batch)
    estimator.pretrain(context, 20)
    state = copy.deepcopy(estimator.state_dict())
    got = estimator.auxiliary_loss(context, batches=3, seed=5)
    q = estimator.forms[0].materialise().detach().double()
    # a linear model's finite-difference product is exact up to O(ε²) for any sampled labels
    exact = _exact_auxiliary_loss(model, x, q, gamma, seed=5, batches=3, batch=batch)
    assert got == pytest.approx(exact, rel=1e-3)
    assert estimator.auxiliary_loss(context, batches=3, seed=5, fvp="ggn") == pytest.approx(exact, rel=1e-5)
    assert estimator.auxiliary_loss(context, batches=3, seed=5) == got  # the same draws every call
    assert estimator.auxiliary_loss(context, batches=3, seed=6) != got
    after = estimator.state_dict()
    assert after["updates"] == state["updates"] == 20
    for saved, now in zip(state["blocks"], after["blocks"]):
        for key in saved["lambda"]:
            assert torch.equal(saved["lambda"][key], now["lambda"][key])


def test_auxiliary_loss_falls_to_its_value_at_the_exact_inverse_as_q_learns():
    model, x = _logistic()
    gamma = 0.1
    estimator = FishLegFisher(damping=gamma, lr=3e-3, update_every=None, init="gradients")
    context = _context(model, x)
    initial = estimator.auxiliary_loss(context)
    estimator.pretrain(context, 300)  # relative error to F_γ⁻¹ 0.58 -> 0.11 (see the test above)
    learned = estimator.auxiliary_loss(context)
    target = torch.linalg.inv(_exact_fisher(model, x) + gamma * torch.eye(C * (D + 1), dtype=torch.float64))
    best = _exact_auxiliary_loss(model, x, target, gamma, seed=0, batches=8, batch=64)
    # measured (estimator seeds 0-2): Q₀ -1.22 to -1.32, learned -2.063 to -2.067, F_γ⁻¹ -2.125 on the same
    # draws (per-batch Fisher, so F_γ⁻¹ of the whole data set is the minimum only on average)
    assert initial > best + 0.5
    assert abs(learned - best) < 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"batches": 0}, "batches=0"), ({"seed": -1}, "seed=-1"), ({"fvp": "exact"}, "fvp='exact': must be one of")],
)
def test_auxiliary_loss_rejects_bad_arguments(kwargs, match):
    model, x = _logistic()
    with pytest.raises(ValueError, match=match):
        FishLegFisher(init="gradients").auxiliary_loss(_context(model, x), **kwargs)


def test_diagonal_is_the_fisher_implied_by_q_floored_at_zero():
    model, x = _logistic()
    estimator = FishLegFisher(damping=0.1, update_every=None, init="gradients")
    context = _context(model, x)
    estimator.pretrain(context, 20)
    inverse = estimator.inverse_diagonal(context)
    fisher = estimator.diagonal(context)
    q = estimator.forms[0].diagQ()[0].detach()
    torch.testing.assert_close(inverse["0.weight"], q)
    torch.testing.assert_close(fisher["0.weight"], (1 / q - 0.1).clamp_min(0))
    assert (fisher["0.weight"] >= 0).all()


def test_inverse_product_is_q_on_the_weight_block_and_adds_the_coupled_bias():
    model, x = _logistic()
    estimator = FishLegFisher(damping=0.1, update_every=None, init="gradients")
    context = _context(model, x)
    estimator.pretrain(context, 20)
    v = torch.randn(C, D)
    q = estimator.forms[0].materialise().detach()  # ordered as [W.flatten(), b]
    full = q[:, : C * D] @ v.flatten()  # Q·[v, 0]
    product = estimator.inverse_product(context, {"0.weight": v})
    assert set(product) == {"0.weight", "0.bias"}  # the bias was not given, but Q couples it
    torch.testing.assert_close(product["0.weight"], full[: C * D].reshape(C, D))
    torch.testing.assert_close(product["0.bias"], full[C * D :])
    assert product["0.bias"].abs().max() > 0.1  # a learned Q couples them (measured 3.1; weight block 14)
    with pytest.raises(KeyError, match="unknown parameters"):
        estimator.inverse_product(context, {"0.bias": torch.zeros(C)})


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.nobias = nn.Conv2d(3, 2, 1, bias=False)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.nobias(torch.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.parametrize(("conv_form", "extra"), [("two_factor", {"conv.bias"}), ("three_factor", set())])
def test_coupled_blocks_only_where_the_form_couples(conv_form, extra):
    torch.manual_seed(0)
    model = _ConvNet()
    names = ["conv.weight", "bn.weight", "nobias.weight", "fc.weight"]
    params = dict(model.named_parameters())
    context = FisherContext(model, {n: params[n] for n in names})
    estimator = FishLegFisher(damping=0.1, conv_form=conv_form, update_every=None, init="identity")
    estimator.build(context)
    with torch.no_grad():  # factors away from the identity, so every Kronecker block couples
        for form in estimator.forms:
            for factor in (getattr(form, a) for a in ("left", "right", "right_in", "right_k") if hasattr(form, a)):
                factor.add_(0.2 * torch.randn_like(factor))
    vectors = {n: torch.randn(params[n].shape) for n in names}
    product = estimator.inverse_product(context, vectors)
    # the Linear's bias always; the conv bias only in the two-factor form (three-factor: a diagonal bias);
    # BatchNorm's diagonal form and the bias-less conv add nothing
    assert set(product) == set(names) | {"fc.bias"} | extra
    q = estimator._where["fc.weight"][0].materialise().detach()
    n = params["fc.weight"].numel()
    torch.testing.assert_close(product["fc.bias"], (q[:, :n] @ vectors["fc.weight"].flatten())[n:])
    # a subset of the given names: only the coupled blocks of the layers it touches
    assert set(estimator.inverse_product(context, {"nobias.weight": vectors["nobias.weight"]})) == {"nobias.weight"}


def test_coupled_names_drop_the_compile_segment():
    torch.manual_seed(0)
    outer = nn.Module()
    outer.net = torch.compile(nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)))
    assert "net._orig_mod.0.bias" in dict(outer.named_parameters())
    pruner = Pruner(0.5, criterion="fisher", schedule="one_shot", compensate=True, keep_first_dense=False)
    pruner.prepare(outer)
    assert list(pruner.parameters) == ["net.0.weight"]
    assert set(pruner.coupled) == {"net.0.bias", "net.2.weight", "net.2.bias"}
    context = FisherContext(outer, dict(pruner.parameters))
    estimator = FishLegFisher(damping=0.1, update_every=None, init="identity")
    inverse = estimator.inverse_diagonal(context)  # no forward pass: the compiled module is never run
    (form,) = estimator.forms
    with torch.no_grad():
        form.right.add_(0.2 * torch.randn_like(form.right))
    v = torch.randn(8, D)
    assert set(estimator.inverse_product(context, {"net.0.weight": v})) == {"net.0.weight", "net.0.bias"}
    bias = outer.net._orig_mod[0].bias.detach().clone()
    pruner.step(0, inverse_diag=inverse, inverse_product=partial(estimator.inverse_product, context))
    assert not torch.equal(outer.net._orig_mod[0].bias.detach(), bias)  # moved through the cleaned name


# ------------------------------------------------------------------------ initialisation


def test_init_reads_the_squisher_from_adam_and_gradients_otherwise():
    model, x = _logistic()
    y = torch.randint(0, C, (N,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x[i * 64 : (i + 1) * 64]), y[i * 64 : (i + 1) * 64]).backward()
        optimizer.step()
    context = _context(model, x, y, optimizer=optimizer, batch_size=64)
    estimator = FishLegFisher(damping=0.1, update_every=None)
    estimator.build(context)
    squisher = Squisher().diagonal(context)
    torch.testing.assert_close(estimator.inverse_diagonal(context)["0.weight"], 1 / (squisher["0.weight"] + 0.1))
    # an optimizer without a squared-gradient state: B·ḡ² at sampled labels, not the Squisher
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    other = FishLegFisher(damping=0.1, update_every=None)
    other.build(_context(model, x, y, optimizer=sgd, batch_size=64))
    assert not torch.allclose(other.inverse_diagonal(context)["0.weight"], 1 / (squisher["0.weight"] + 0.1))
    with pytest.raises(ValueError, match="init='squisher'"):
        FishLegFisher(init="squisher").build(_context(model, x, y, optimizer=sgd, batch_size=64))


def _adam_logistic(steps: int = 3):
    """Logistic regression after ``steps`` Adam steps, and a function that trains it further."""
    model, x = _logistic()
    y = torch.randint(0, C, (N,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def train(steps: int) -> None:
        for i in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i % 8 * 64 : (i % 8 + 1) * 64]), y[i % 8 * 64 : (i % 8 + 1) * 64]).backward()
            optimizer.step()

    train(steps)
    return model, x, y, optimizer, train


def test_refresh_diagonal_follows_the_current_fisher_and_keeps_the_learned_correlations():
    model, x, y, optimizer, train = _adam_logistic()
    context = _context(model, x, y, optimizer=optimizer, batch_size=64)
    refreshed = FishLegFisher(damping=0.1, update_every=None, refresh_diagonal=True)
    plain = FishLegFisher(damping=0.1, update_every=None)
    for estimator in (refreshed, plain):
        estimator.build(context)
        estimator.pretrain(context, 20)  # the same updates: λ learns the same correlations in both
    (form,) = refreshed.forms

    def correlations(q: Tensor) -> Tensor:
        return q / torch.outer(q.diagonal(), q.diagonal()).sqrt()

    learned = form.materialise().detach()
    train(20)  # the network moves on: Adam's second moment changes
    everything = _context(model, x, y, optimizer=optimizer, batch_size=64)
    everything.parameters.update(model.named_parameters())
    expected = {n: 1 / (f + 0.1) for n, f in Squisher().diagonal(everything).items()}
    got = refreshed.inverse_diagonal(context)
    torch.testing.assert_close(got["0.weight"], expected["0.weight"])
    torch.testing.assert_close(refreshed._diag()["0.bias"], expected["0.bias"])  # the coupled bias too
    torch.testing.assert_close(correlations(form.materialise().detach()), correlations(learned))
    # without the refresh the diagonal is still the learned one, not the current Fisher's
    assert not torch.allclose(plain.inverse_diagonal(context)["0.weight"], expected["0.weight"], rtol=0.05)
    torch.testing.assert_close(plain.forms[0].materialise().detach(), learned)


def test_refresh_diagonal_rescales_pruned_coordinates_too(trained_mlp):
    model, x, y = trained_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    context = _context(model, x, y, optimizer=optimizer, batch_size=64)
    estimator = FishLegFisher(damping=0.1, update_every=None, refresh_diagonal=True)
    estimator.pretrain(context, 5)
    mask = torch.rand(model[0].weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    context.extra["masks"] = {"0.weight": mask}
    fisher = Squisher().diagonal(context)["0.weight"]
    torch.testing.assert_close(estimator.inverse_diagonal(context)["0.weight"], 1 / (fisher + 0.1))
    # the Fisher Q implies is the current one on the pruned coordinates as on the survivors: left stale
    # there, it would shift the relative damping of criterion="fisher" away from OBD's on the same F̂
    implied = estimator.diagonal(context)["0.weight"]
    torch.testing.assert_close(1 / estimator._diag()["0.weight"] - 0.1, fisher, rtol=1e-4, atol=1e-6 * 0.1)
    # and it is F̂ itself, not 1/Q_qq − γ, which keeps few of F̂'s digits where F̂ ≪ γ (as here)
    assert torch.equal(implied, fisher)


def test_refresh_match_fisher_gives_the_implied_fisher_the_current_diagonal():
    model, x, y, optimizer, train = _adam_logistic()
    context = _context(model, x, y, optimizer=optimizer, batch_size=64)
    estimator = FishLegFisher(damping=0.1, update_every=None, refresh_diagonal=True, refresh_match="fisher")
    estimator.pretrain(context, 20)
    (form,) = estimator.forms
    learned = form.materialise().detach().double()
    train(20)
    everything = _context(model, x, y, optimizer=optimizer, batch_size=64)
    everything.parameters.update(model.named_parameters())
    squisher = Squisher().diagonal(everything)
    damped = torch.cat([squisher["0.weight"].flatten(), squisher["0.bias"]]).double() + 0.1
    got = estimator.inverse_diagonal(context)["0.weight"]
    q = form.materialise().detach().double()
    # the Fisher Q implies, Q⁻¹ − γI, has the current diagonal, bias included
    torch.testing.assert_close(torch.linalg.inv(q).diagonal(), damped, rtol=1e-4, atol=0)
    # Q_qq = ρ_q/(F̂_q + γ): above the inverse match wherever the learned factors correlate coordinates
    torch.testing.assert_close(got.double().flatten(), q.diagonal()[: C * D], rtol=1e-5, atol=0)
    rho = q.diagonal() * damped
    assert bool((rho > 1 - 1e-5).all()) and float(rho.max()) > 1.001
    inverse_q = torch.linalg.inv(q)
    torch.testing.assert_close(  # the refresh moves only D: Q⁻¹'s correlations are the learned ones
        inverse_q / torch.outer(inverse_q.diagonal(), inverse_q.diagonal()).sqrt(),
        torch.linalg.inv(learned) / torch.outer(torch.linalg.inv(learned).diagonal(), torch.linalg.inv(learned).diagonal()).sqrt(),
    )


def test_relative_damping_is_a_multiple_of_the_mean_fisher_retaken_at_every_refresh():
    model, x, y, optimizer, train = _adam_logistic()
    context = _context(model, x, y, optimizer=optimizer, batch_size=64)
    refreshed = FishLegFisher(damping=0.5, relative_damping=True, update_every=None, refresh_diagonal=True)
    fixed = FishLegFisher(damping=0.5, relative_damping=True, update_every=None)
    first = 0.5 * float(Squisher().diagonal(context)["0.weight"].mean())  # the pruned weights only, no bias
    for estimator in (refreshed, fixed):
        estimator.build(context)
        assert estimator.gamma == pytest.approx(first, rel=1e-6)
    train(20)
    now = Squisher().diagonal(context)["0.weight"]
    assert float(now.mean()) != pytest.approx(first / 0.5, rel=1e-2)  # the Fisher's scale moved
    diagonal = refreshed.inverse_diagonal(context)["0.weight"]
    assert refreshed.gamma == pytest.approx(0.5 * float(now.mean()), rel=1e-6)
    torch.testing.assert_close(diagonal, 1 / (now + refreshed.gamma))
    assert fixed.inverse_diagonal(context) and fixed.gamma == pytest.approx(first, rel=1e-6)  # no refresh: kept
    # γ is saved: a resumed estimator learns against the same F_γ, and a fixed damping refuses another one
    resumed = FishLegFisher(damping=0.5, relative_damping=True, update_every=None, refresh_diagonal=True)
    resumed.load_state_dict(refreshed.state_dict())
    assert resumed.gamma == refreshed.gamma
    with pytest.raises(ValueError, match=r"damping=0.5: the state was saved with γ="):
        FishLegFisher(damping=0.5, update_every=None).load_state_dict(refreshed.state_dict())


class _CountingSource(FisherEstimator):
    """A diagonal source with state: F̂ = (calls so far + 1) · 1e-2 everywhere."""

    requires_data = True

    def __init__(self) -> None:
        self.calls, self.steps = 0, []

    def diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        self.calls += 1
        return {n: torch.full_like(p, self.calls * 1e-2) for n, p in context.parameters.items()}

    def on_train_step(self, context: FisherContext, step: int) -> dict[str, float]:
        self.steps.append(step)
        return {"source/step": float(step)}

    def check(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is None:
            raise ValueError("needs an optimizer")

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def test_diagonal_source_gives_q0_every_refresh_and_the_relative_damping():
    model, x, y, optimizer, _ = _adam_logistic()
    context = _context(model, x, y, optimizer=optimizer, batch_size=64, loss_fn=F.cross_entropy)
    empirical = EmpiricalFisher(num_samples=N)
    estimator = FishLegFisher(damping=1.0, relative_damping=True, update_every=None, diagonal_source=empirical)
    estimator.build(context)
    everything = _context(model, x, y, optimizer=optimizer, batch_size=64, loss_fn=F.cross_entropy)
    everything.parameters.update(model.named_parameters())
    expected = empirical.diagonal(everything)  # weight and bias: Q's block covers both
    assert estimator.gamma == pytest.approx(float(expected["0.weight"].mean()), rel=1e-5)
    torch.testing.assert_close(estimator.inverse_diagonal(context)["0.weight"], 1 / (expected["0.weight"] + estimator.gamma))
    torch.testing.assert_close(estimator._diag()["0.bias"], 1 / (expected["0.bias"] + estimator.gamma))
    squisher = Squisher().diagonal(context)["0.weight"]
    assert not torch.allclose(expected["0.weight"], squisher, rtol=0.05)  # a different F̂ from the default's

    counting = _CountingSource()
    refreshed = FishLegFisher(damping=0.1, update_every=1, refresh_diagonal=True, diagonal_source=counting)
    refreshed.build(context)  # Q₀: the first read
    got = refreshed.inverse_diagonal(context)["0.weight"]  # a refresh: the second
    torch.testing.assert_close(got, torch.full_like(got, 1 / (2e-2 + 0.1)))
    metrics = refreshed.on_train_step(context, 3)
    assert counting.steps == [3] and metrics["source/step"] == 3.0 and "fishleg/aux_loss" in metrics
    # the source's state travels with Q's, and its check runs as FishLeg's
    resumed = FishLegFisher(damping=0.1, update_every=1, refresh_diagonal=True, diagonal_source=_CountingSource())
    resumed.load_state_dict(refreshed.state_dict())
    assert resumed.diagonal_source.calls == 2
    with pytest.raises(ValueError, match="holds a diagonal_source's state"):
        FishLegFisher(damping=0.1).load_state_dict(refreshed.state_dict())
    with pytest.raises(ValueError, match="needs an optimizer"):
        refreshed.check(None)
    # a stateless source adds nothing to the state
    assert "diagonal_source" not in estimator.state_dict()


def test_other_layer_types_fall_back_to_diagonal_with_one_warning():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(6, 3), nn.Unflatten(1, (3, 1)), nn.Conv1d(3, 3, 1), nn.Flatten())
    x = torch.randn(16, 2, 4)
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    context = FisherContext(model, params, batches=lambda: [(x, torch.zeros(16, dtype=torch.long))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FishLegFisher(update_every=None, init="gradients").build(context)
    messages = [str(w.message) for w in caught if "falls back to a diagonal" in str(w.message)]
    assert messages == ["FishLegFisher: no Kronecker form for these layers, their Q falls back to a diagonal: ['0', '4']"]


# ------------------------------------------------------------------------ pruning


def test_obs_compensation_loses_less_than_plain_zeroing(trained_mlp):
    model, x, y = trained_mlp()
    params = {"0.weight": model[0].weight}
    context = FisherContext(model, params, batches=lambda: [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)])
    estimator = FishLegFisher(damping=1e-2, lr=3e-3, update_every=None, init="gradients", pretrain_steps=200)
    inverse = estimator.inverse_diagonal(context)
    scores = score_obs(model[0].weight, inverse["0.weight"])
    pruned = {"0.weight": scores <= scores.flatten().kthvalue(48).values}  # 48 of 128 weights
    zeroed, weights_only = copy.deepcopy(model), copy.deepcopy(model)

    def product(v: dict[str, Tensor]) -> dict[str, Tensor]:
        return estimator.inverse_product(context, v)

    obs_compensate_(params, pruned, inverse, product, {"0.bias": model[0].bias})
    given_only = lambda v: {k: b for k, b in product(v).items() if k in v}  # noqa: E731 - drops the bias block
    obs_compensate_({"0.weight": weights_only[0].weight}, pruned, inverse, given_only)
    with torch.no_grad():
        dense_loss = float(F.cross_entropy(zeroed(x), y))
        for net in (zeroed, weights_only, model):
            net[0].weight[pruned["0.weight"]] = 0
        zero_loss, obs_loss = float(F.cross_entropy(zeroed(x), y)), float(F.cross_entropy(model(x), y))
        weights_only_loss = float(F.cross_entropy(weights_only(x), y))
    # measured: dense 0.0138, zeroed 0.0170, OBS-compensated 0.0159, i.e. 0.665 of the zeroing increase with
    # the coupled bias moved (0.653 with the weights only); 0.43-0.90 over damping 1e-3..1e-1 and 32-64 pruned
    # weights; asserted 0.85
    assert obs_loss - dense_loss < 0.85 * (zero_loss - dense_loss)
    # zeroing did cost something, so the comparison above means something
    assert zero_loss > dense_loss
    # With this learned Kronecker Q the bias step neither helps nor hurts much: increase with bias / weights
    # only measured 1.018 here, 0.96-1.04 over damping 1e-3..1e-1, 8-100 pruned weights, noisy labels and
    # seeds 0-4 (either side of 1). With the exact damped inverse Fisher it helps (0.81-0.95: see
    # tests/pruning/test_surgeon.py). Asserted: no more than 5% worse.
    assert obs_loss - dense_loss < 1.05 * (weights_only_loss - dense_loss)
    assert not torch.equal(model[0].bias, zeroed[0].bias)  # the bias did move


def test_pruner_moves_the_coupled_bias_and_never_masks_it(trained_mlp):
    model, x, y = trained_mlp()
    reference = copy.deepcopy(model)
    pruner = Pruner(0.5, criterion="fisher", schedule="one_shot", compensate=True, keep_first_dense=False)
    pruner.prepare(model)
    assert list(pruner.parameters) == ["0.weight"]
    assert set(pruner.coupled) == {"0.bias", "2.weight", "2.bias"}
    context = _context(model, x, y)
    context.parameters = dict(pruner.parameters)
    estimator = FishLegFisher(damping=0.1, update_every=None, init="gradients", pretrain_steps=20)
    inverse = estimator.inverse_diagonal(context)
    product = partial(estimator.inverse_product, context)
    mask = score_obs(model[0].weight, inverse["0.weight"]) > score_obs(model[0].weight, inverse["0.weight"]).median()
    with torch.no_grad():
        v = torch.where(~mask, model[0].weight / inverse["0.weight"], torch.zeros_like(model[0].weight))
        expected = {n: b.clone() for n, b in product({"0.weight": v}).items()}
    pruner.step(0, inverse_diag=inverse, inverse_product=product)
    assert torch.equal(pruner.masks["0.weight"], mask)
    torch.testing.assert_close(model[0].bias.detach(), reference[0].bias.detach() - expected["0.bias"])
    torch.testing.assert_close(model[0].weight.detach()[mask], (reference[0].weight.detach() - expected["0.weight"])[mask])
    assert (model[0].weight[~mask] == 0).all()
    # the other layer's parameters are in no block of Q: untouched
    assert torch.equal(model[2].weight, reference[2].weight) and torch.equal(model[2].bias, reference[2].bias)
    pruner.apply_()  # masks the weights only: the moved bias stays
    torch.testing.assert_close(model[0].bias.detach(), reference[0].bias.detach() - expected["0.bias"])


def test_masked_refinement_never_updates_pruned_coordinates(trained_mlp):
    model, x, y = trained_mlp()
    context = _context(model, x, y)
    estimator = FishLegFisher(damping=0.1, update_every=None, init="gradients")
    estimator.pretrain(context, 5)  # Adam's momentum of λ is non-zero everywhere now
    mask = torch.rand(model[0].weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    context.extra["masks"] = {"0.weight": mask, "2.weight": torch.ones_like(model[2].weight, dtype=torch.bool)}
    scale = estimator._where["0.weight"][0].scales[0]
    before = scale.detach().clone()
    estimator.pretrain(context, 10)
    after = scale.detach()
    assert torch.equal(after[~mask], before[~mask])
    assert (after[mask] != before[mask]).float().mean() > 0.9  # the survivors' entries did move


def test_a_prune_in_place_or_by_new_masks_reaches_the_next_update(trained_mlp):
    """Which coordinates are frozen, and the count A is averaged over, are derived from the masks once per
    change; a prune that writes a mask in place and one that hands over new masks are both seen."""
    model, x, y = trained_mlp()
    context = _context(model, x, y)
    estimator = FishLegFisher(damping=0.1, update_every=None, init="gradients")
    mask = torch.ones_like(model[0].weight, dtype=torch.bool)
    context.extra["masks"] = {"0.weight": mask}
    estimator.pretrain(context, 3)  # every weight kept: nothing frozen yet, and the derivation is cached
    scale = estimator._where["0.weight"][0].scales[0]
    for prune in ("in place", "new masks"):
        if prune == "in place":
            mask.view(-1)[::2] = False
        else:
            mask = mask.clone()
            mask.view(-1)[1::4] = False
            context.extra["masks"] = {"0.weight": mask}
        before = scale.detach().clone()
        estimator.pretrain(context, 3)
        assert torch.equal(scale.detach()[~mask], before[~mask]), prune
        assert (scale.detach()[mask] != before[mask]).float().mean() > 0.9, prune
        fresh = FishLegFisher(damping=0.1, update_every=None, init="gradients")
        fresh.load_state_dict(estimator.state_dict())
        assert estimator.auxiliary_loss(context) == fresh.auxiliary_loss(context), prune  # same survivors, same count


def test_diag_agreement_of_fewer_parameters_is_not_the_cached_one_of_all():
    """The survivors' positions are cached per masks and parameters: the metric of a subset of the
    parameters, after one of all of them, is what an estimator asked only for the subset gives."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, C))
    x, y = torch.randn(64, D), torch.randint(0, C, (64,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    context = _context(model, x, y, optimizer=optimizer, batch_size=64)
    context.extra["masks"] = {"2.weight": torch.rand(C, D) > 0.5}  # the same masks for both: only 2.weight has one
    subset = dataclasses.replace(context, parameters={"2.weight": context.parameters["2.weight"]})
    estimator = FishLegFisher(agreement_samples=10_000, fvp="ggn", lr=0.1)
    estimator.pretrain(context, 5)  # Q no longer the Squisher's diagonal, whose agreement would be 1 on any subset
    fresh = copy.deepcopy(estimator)
    estimator.diag_agreement(context)
    assert estimator.diag_agreement(subset) == fresh.diag_agreement(subset)


def test_an_update_and_its_metric_read_the_device_three_times_at_any_depth():
    """After a prune has been seen, an auxiliary update reads one number from the device (its loss) and
    the agreement metric two, however many layers there are (each read is a GPU sync). Reads of the
    optimizers' step counters are left out: they are CPU tensors, no sync on a GPU."""
    torch.manual_seed(0)
    counts = []
    for depth in (2, 5):
        model = nn.Sequential(*[nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(depth)], nn.Linear(D, C))
        x, y = torch.randn(64, D), torch.randint(0, C, (64,))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        context = _context(model, x, y, optimizer=optimizer, batch_size=64)
        context.extra["masks"] = {n: torch.rand(p.shape) > 0.5 for n, p in context.parameters.items()}
        estimator = FishLegFisher(update_every=1, fvp="ggn")
        estimator.on_train_step(context, 1)
        estimator.on_train_step(context, 2)
        steps = [s["step"] for o in (optimizer, estimator._adam) for s in o.state.values()]
        with HostSyncCounter(ignore=steps) as counter:
            metrics = estimator.on_train_step(context, 3)
        assert set(metrics) == {"fishleg/aux_loss", "fishleg/diag_agreement"}
        counts.append(counter.total)
        with HostSyncCounter(ignore=steps) as counter:
            estimator.pretrain(context, 1)
        assert counter.total == 1, dict(counter.counts)
    assert counts == [3, 3]


def test_nm_with_fishleg_scores_keeps_the_top_n_of_every_group(trained_mlp):
    model, x, y = trained_mlp()
    pruner = Pruner(criterion="fisher", pattern="2:4", schedule="one_shot", compensate=True, keep_first_dense=False)
    pruner.prepare(model)
    assert list(pruner.parameters) == ["0.weight"]
    context = _context(model, x, y)
    estimator = FishLegFisher(damping=0.1, update_every=None, init="gradients", pretrain_steps=20)
    inverse = estimator.inverse_diagonal(context)
    scores = score_obs(model[0].weight, inverse["0.weight"])
    expected = torch.zeros_like(scores, dtype=torch.bool)
    top = to_reduction_layout(scores).reshape(-1, 4).topk(2, dim=1).indices
    expected.view(-1, 4).scatter_(1, top, True)  # a Linear's reduction layout is the weight itself
    pruner.step(0, inverse_diag=inverse, inverse_product=lambda v: estimator.inverse_product(context, v))
    assert torch.equal(pruner.masks["0.weight"], expected)
    assert (model[0].weight[~expected] == 0).all()
    assert int(expected.view(-1, 4).sum(1).unique().item()) == 2


# ------------------------------------------------------------------------ training hook


def _context_after_an_adam_step() -> FisherContext:
    """The logistic model after one Adam step (so the Squisher has state), with its batch as the context's."""
    model, x, y = _logistic()[0], torch.randn(64, D), torch.randint(0, C, (64,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return _context(model, x, y, optimizer=optimizer, batch_size=64)


def test_on_train_step_updates_every_k_steps_and_reports_metrics():
    context = _context_after_an_adam_step()
    estimator = FishLegFisher(update_every=2)
    assert estimator.on_train_step(context, 1) == {}
    assert estimator.updates == 0
    metrics = estimator.on_train_step(context, 2)
    assert estimator.updates == 1 and set(metrics) == {"fishleg/aux_loss", "fishleg/diag_agreement"}
    assert -1.0 <= metrics["fishleg/diag_agreement"] <= 1.0
    # the base class hook is a no-op
    assert FisherEstimator.on_train_step(estimator, context, 2) == {}


def test_diag_agreement_draws_its_subsample_once_per_entry_count(monkeypatch):
    """The seeded subsample is the same draw at every update: it is drawn again only when the number of
    entries changes (a prune), and the metric is what a fresh draw gives."""
    context = _context_after_an_adam_step()
    estimator = FishLegFisher(update_every=1, agreement_samples=5)
    estimator.build(context)
    first = estimator.diag_agreement(context)
    fresh = FishLegFisher(update_every=1, agreement_samples=5)
    fresh.load_state_dict(estimator.state_dict())
    fresh.build(context)
    assert fresh.diag_agreement(context) == first  # the cached draw is the seeded one
    draws = []
    real_randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: draws.append(a[0]) or real_randperm(*a, **k))
    assert estimator.diag_agreement(context) == first and draws == []
    name = next(iter(context.parameters))
    mask = torch.ones_like(context.parameters[name], dtype=torch.bool)
    mask.view(-1)[:3] = False
    context.extra["masks"] = {name: mask}
    estimator.diag_agreement(context)
    estimator.diag_agreement(context)
    assert len(draws) == 1  # fewer entries after a prune: one new draw, then reused


# ------------------------------------------------------------------------ state


def test_state_dict_round_trip_resumes_exactly(trained_mlp):
    model, x, y = trained_mlp()
    a = FishLegFisher(damping=0.1, update_every=None, init="gradients")
    context = _context(model, x, y)
    a.pretrain(context, 4)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # plain tensors and Python only
    b = FishLegFisher(damping=0.1, update_every=None, init="identity")
    b.load_state_dict(state)  # before build: kept until the forms exist
    assert b.state_dict() is not None and b.updates == 4
    b.build(context)
    for fa, fb in zip(a.forms, b.forms):
        torch.testing.assert_close(fa.materialise(), fb.materialise(), rtol=0, atol=0)
    a.pretrain(context, 3)
    b.pretrain(context, 3)  # same Adam state, same probes (seeded by the update count)
    for fa, fb in zip(a.forms, b.forms):
        torch.testing.assert_close(fa.materialise(), fb.materialise(), rtol=0, atol=0)
    # loading into a built estimator works too, and an empty state (a dense checkpoint) changes nothing
    c = FishLegFisher(damping=0.1, update_every=None, init="identity")
    c.build(context)
    c.load_state_dict(a.state_dict())
    c.load_state_dict({})
    torch.testing.assert_close(c.forms[0].materialise(), a.forms[0].materialise(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="conv_form='two_factor': the state was saved with conv_form='three_factor'"):
        FishLegFisher(conv_form="two_factor").load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="state version 7"):
        c.load_state_dict({"version": 7})


def test_all_names_resolve():
    for name in estimator_module.__all__:
        assert hasattr(estimator_module, name), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(damping=0.0), r"damping=0.0: must be a positive finite number"),
        (dict(damping=-1), r"damping=-1: must be a positive finite number"),
        (dict(damping=float("inf")), r"damping=inf: must be a positive finite number"),
        (dict(conv_form="four_factor"), r"conv_form='four_factor': must be one of \('two_factor', 'three_factor'\)"),
        (dict(update_every=0), r"update_every=0: must be an integer >= 1"),
        (dict(update_every=2.5), r"update_every=2.5: must be an integer >= 1"),
        (dict(pretrain_steps=-1), r"pretrain_steps=-1: must be an integer >= 0"),
        (dict(lr=0), r"lr=0: must be a positive finite number"),
        (dict(probe="uniform"), r"probe='uniform': must be one of \('gaussian', 'gradient'\)"),
        (dict(fvp="exact"), r"fvp='exact': must be one of \('finite_difference', 'rank1', 'ggn'\)"),
        (dict(fd_eps=0), r"fd_eps=0: must be a positive finite number"),
        (dict(init="zeros"), r"init='zeros': must be one of"),
        (dict(init_batches=0), r"init_batches=0: must be an integer >= 1"),
        (dict(seed=-1), r"seed=-1: must be an integer >= 0"),
        (dict(floor=0.0), r"floor=0.0: must be a positive finite number"),
        (dict(refresh_diagonal=True, init="identity"), r"refresh_diagonal=True with init='identity'"),
        (dict(relative_damping=True, init="identity"), r"relative_damping=True with init='identity'"),
        (dict(refresh_match="hessian"), r"refresh_match='hessian': must be one of \('inverse', 'fisher'\)"),
        (dict(diagonal_source=FishLegFisher()), r"diagonal_source=FishLegFisher\(.*must be a diagonal FisherEstimator"),
        (dict(diagonal_source="empirical"), r"diagonal_source='empirical': must be a diagonal FisherEstimator"),
        (dict(diagonal_source=Squisher(), init="gradients"), r"init='gradients' with a diagonal_source"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FishLegFisher(**kwargs)
