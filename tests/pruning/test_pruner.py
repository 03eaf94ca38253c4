import math

import pytest
import torch
from torch import Tensor, nn

from lightning_fisher.pruning.patterns import to_reduction_layout
from lightning_fisher.pruning.pruner import Pruner
from lightning_fisher.pruning.surgeon import obs_update


class Net(nn.Module):
    """stem (in=3, dense by default), c1 (in=8), c2 (in=6: not a multiple of 4), fc1, fc (classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.c1 = nn.Conv2d(8, 6, 3)
        self.c2 = nn.Conv2d(6, 8, 3)
        self.fc1 = nn.Linear(16, 12)
        self.fc = nn.Linear(12, 10)


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _pruned_counts(pruner: Pruner) -> dict[str, int]:
    return {k: int((~m).sum()) for k, m in pruner.masks.items()}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_reaches_the_target_exactly(scope):
    net = _net()
    pruner = Pruner(0.8, criterion="magnitude", scope=scope, start=1, end=5, frequency=2)
    pruner.prepare(net)
    assert list(pruner.parameters) == ["c1.weight", "c2.weight", "fc1.weight"]
    targets = []
    for t in range(8):
        event = pruner.step(t)
        if event is not None:
            targets.append((t, event.target_sparsity))
    assert [t for t, _ in targets] == [1, 3, 5]
    assert targets[-1][1] == 0.8 and targets[1][1] == pytest.approx(0.8 * (1 - 0.5**3))
    counts = _pruned_counts(pruner)
    if scope == "layer":
        for name, p in pruner.parameters.items():
            assert counts[name] == round(0.8 * p.numel())
            assert (p[~pruner.masks[name]] == 0).all()
    else:
        total = sum(p.numel() for p in pruner.parameters.values())
        assert sum(counts.values()) == round(0.8 * total)
    # within one weight per layer
    total = sum(p.numel() for p in pruner.parameters.values())
    assert pruner.sparsity() == pytest.approx(0.8, abs=len(pruner.masks) / total)


def test_masks_are_monotone_over_steps():
    net = _net()
    pruner = Pruner(0.9, criterion="random", start=0, end=6)
    pruner.prepare(net)
    previous = {k: m.clone() for k, m in pruner.masks.items()}
    for t in range(7):
        pruner.step(t)
        for k, m in pruner.masks.items():
            assert not (m & ~previous[k]).any()  # nothing comes back
        previous = {k: m.clone() for k, m in pruner.masks.items()}


def test_iterative_reaches_the_target():
    pruner = Pruner(0.8, criterion="magnitude", schedule="iterative", iterative_fraction=0.5, start=0, frequency=1)
    pruner.prepare(_net())
    levels = [pruner.step(t).target_sparsity for t in range(3)]
    assert levels == pytest.approx([0.5, 0.75, 0.8]) and pruner.step(3) is None
    total = sum(p.numel() for p in pruner.parameters.values())
    assert sum(_pruned_counts(pruner).values()) == round(0.8 * total)


def test_nm_gradual_reaches_every_group_and_skips_ineligible_layers():
    net = _net()
    pruner = Pruner(criterion="magnitude", pattern="2:4", scope="layer", start=0, end=4, frequency=1)
    with pytest.warns(UserWarning, match=r"stay dense.*\['c2.weight'\]"):
        pruner.prepare(net)
    assert list(pruner.parameters) == ["c1.weight", "fc1.weight"]
    fractions = []
    for t in range(5):
        pruner.step(t)
        held = [(to_reduction_layout(m).reshape(-1, 4).sum(1) <= 2).float().mean().item() for m in pruner.masks.values()]
        fractions.append(held)
    # cubic ramp of the fraction of groups at 2:4, reaching 100% at end=4
    for t, held in enumerate(fractions):
        expected = 1 - (1 - t / 4) ** 3
        for h, m in zip(held, pruner.masks.values()):
            groups = m.numel() // 4
            assert abs(h - expected) <= 1 / groups + 1e-9
    assert fractions[-1] == [1.0, 1.0]
    for m in pruner.masks.values():
        assert (to_reduction_layout(m).reshape(-1, 4).sum(1) == 2).all()
    assert pruner.sparsity() == 0.5 and pruner.scheduled_sparsity(4) == 0.5


def test_one_shot_prunes_once():
    pruner = Pruner(0.5, criterion="magnitude", schedule="one_shot", start=2, end=99)
    pruner.prepare(_net())
    assert pruner.step(0) is None and pruner.step(1) is None
    assert pruner.step(2).sparsity == pytest.approx(0.5, abs=1e-3)
    assert pruner.step(3) is None and not pruner.due(10)


def test_state_dict_round_trip_into_a_fresh_model_resumes_identically():
    def run(pruner: Pruner, positions: range) -> None:
        for t in positions:
            pruner.step(t)

    reference = Pruner(0.9, criterion="random", start=0, end=6, seed=3)
    reference.prepare(_net())
    run(reference, range(7))

    first = Pruner(0.9, criterion="random", start=0, end=6, seed=3)
    first.prepare(_net())
    run(first, range(3))
    state = first.state_dict()
    assert state["version"] == 1 and state["position"] == {"last_pruned": 2, "num_prunes": 3}
    assert all(v.dtype == torch.bool and v.device.type == "cpu" for v in state["masks"].values())

    resumed = Pruner(0.9, criterion="random", start=0, end=6, seed=3)
    resumed.load_state_dict(state)  # before prepare: kept and applied by prepare
    net = _net()
    resumed.prepare(net)
    assert (net.c1.weight[~resumed.masks["c1.weight"]] == 0).all()
    run(resumed, range(3, 7))
    assert all(torch.equal(resumed.masks[k], reference.masks[k]) for k in reference.masks)


def test_load_state_dict_is_strict():
    pruner = Pruner(0.5, criterion="magnitude", start=0, end=2)
    pruner.prepare(_net())
    state = pruner.state_dict()
    other = Pruner(0.5, criterion="magnitude", start=0, end=2, include=["c1", "fc1"])
    other.prepare(_net())
    with pytest.raises(KeyError, match=r"missing \[\], unexpected \['c2.weight'\]"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="pruner state version 7"):
        other.load_state_dict({**state, "version": 7})


def test_attach_keeps_weights_zero_after_every_step_and_skipped_amp_steps():
    net = _net()
    pruner = Pruner(0.7, criterion="magnitude", schedule="one_shot", start=0)
    pruner.prepare(net)
    pruner.step(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1, weight_decay=0.1)
    handle = pruner.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(4, 3, 8, 8)
    for i in range(5):
        optimizer.zero_grad()
        out = net.fc(net.fc1(net.c2(net.c1(net.stem(x))).mean((2, 3)).repeat(1, 2)))
        loss = out.square().mean() * (float("inf") if i == 2 else 1.0)  # step 2 is skipped by the scaler
        scaler.scale(loss).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
        scaler.step(optimizer)
        scaler.update()
        for name, p in pruner.parameters.items():
            assert (p[~pruner.masks[name]] == 0).all(), (i, name)
    assert optimizer.state[net.c1.weight]["exp_avg_sq"].abs().sum() > 0  # the Squisher's Fisher is untouched
    handle.remove()


def test_obs_single_weight_matches_the_closed_form():
    torch.manual_seed(0)
    w = torch.randn(2, 3)
    a = torch.randn(6, 6)
    q = a @ a.T + 0.5 * torch.eye(6)  # SPD
    pruned = torch.zeros(2, 3, dtype=torch.bool)
    pruned[1, 0] = True
    qi = 3
    delta = obs_update({"w": w}, {"w": pruned}, {"w": torch.diagonal(q).reshape(2, 3)},
                       lambda v: {k: (q @ x.flatten()).reshape(x.shape) for k, x in v.items()})["w"]
    expected = -q[:, qi] * w.flatten()[qi] / q[qi, qi]  # δθ = −Q e_q θ_q / Q_qq
    torch.testing.assert_close(delta.flatten(), expected)
    assert (w + delta).flatten()[qi].abs() < 1e-5  # the pruned weight lands on zero by itself


def test_compensating_pruner_with_diagonal_inverse_equals_obd():
    torch.manual_seed(0)
    fisher = {}

    def make(compensate: bool) -> tuple[Pruner, Net]:
        net = _net()
        pruner = Pruner(0.5, criterion="fisher", schedule="one_shot", start=0, compensate=compensate)
        pruner.prepare(net)
        return pruner, net

    obd, net_obd = make(False)
    fisher.update({k: torch.rand_like(p) + 0.1 for k, p in obd.parameters.items()})
    obd.step(0, fisher)
    obs, net_obs = make(True)
    inverse = {k: 1 / f for k, f in fisher.items()}
    obs.step(0, inverse_diag=inverse, inverse_product=lambda v: {k: inverse[k] * x for k, x in v.items()})
    for k in obd.masks:
        assert torch.equal(obd.masks[k], obs.masks[k])
        torch.testing.assert_close(obd.parameters[k].detach(), obs.parameters[k].detach())


@pytest.mark.parametrize("obs_iterations", [0, 200])
def test_compensating_pruner_moves_survivors_with_a_dense_inverse(obs_iterations):
    net = _net()
    pruner = Pruner(0.5, criterion="fisher", schedule="one_shot", start=0, compensate=True, include=["fc1"],
                    obs_iterations=obs_iterations)
    pruner.prepare(net)
    w = net.fc1.weight.detach().clone()
    n = w.numel()
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)) / math.sqrt(n)
    q = a @ a.T + 0.1 * torch.eye(n)
    diag = {"fc1.weight": torch.diagonal(q).reshape(w.shape)}
    pruner.step(0, inverse_diag=diag, inverse_product=lambda v: {k: (q @ x.flatten()).reshape(x.shape) for k, x in v.items()})
    mask = pruner.masks["fc1.weight"]
    if obs_iterations:  # the joint step −Q E_T (Q_TT)⁻¹ θ_T, T = the pruned weights
        t = (~mask).flatten().nonzero().flatten()
        x = torch.linalg.solve(q[t][:, t].double(), w.flatten()[t].double()).float()
        expected = w.flatten() - q[:, t] @ x
    else:
        expected = w.flatten() - q @ torch.where(~mask, w / diag["fc1.weight"], torch.zeros_like(w)).flatten()
    torch.testing.assert_close(net.fc1.weight.detach()[mask], expected.reshape(w.shape)[mask], rtol=1e-4, atol=1e-5)
    assert (net.fc1.weight[~mask] == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_sparsity=1.0), r"target_sparsity=1.0: must be in \[0, 1\)"),
        (dict(target_sparsity=-0.1), r"target_sparsity=-0.1: must be in \[0, 1\)"),
        (dict(target_sparsity=None), r"target_sparsity=None: an unstructured pattern needs"),
        (dict(target_sparsity=0.9, pattern="2:4"), r"target_sparsity=0.9: pattern='2:4' prunes exactly"),
        (dict(pattern="2:4", schedule="iterative"), r"schedule='iterative': not available with pattern='2:4'"),
        (dict(pattern="2:4", initial_sparsity=0.1), r"initial_sparsity=0.1: must be 0 with an N:M pattern"),
        (dict(target_sparsity=0.5, initial_sparsity=0.6), r"initial_sparsity=0.6: must be in \[0, target_sparsity=0.5\]"),
        (dict(target_sparsity=0.5, criterion="taylor"), r"criterion='taylor': must be one of"),
        (dict(target_sparsity=0.5, scope="net"), r"scope='net': must be one of"),
        (dict(target_sparsity=0.5, schedule="cubic"), r"schedule='cubic': must be one of"),
        (dict(target_sparsity=0.5, criterion="magnitude", compensate=True), r"compensate=True: needs criterion='fisher'"),
        (dict(target_sparsity=0.5, fisher_damping=-1.0), r"fisher_damping=-1.0: must be a finite float >= 0"),
        (dict(target_sparsity=0.5, fisher_damping=float("inf")), r"fisher_damping=inf: must be a finite float >= 0"),
        (dict(target_sparsity=0.5, criterion="magnitude", fisher_damping=0.5),
         r"fisher_damping=0.5: only the OBD score .* got criterion='magnitude'"),
        (dict(target_sparsity=0.5, criterion="fisher", compensate=True, fisher_damping=0.5),
         r"fisher_damping=0.5: only the OBD score .* got compensate=True"),
        (dict(target_sparsity=0.5, obs_iterations=-1), r"obs_iterations=-1: must be >= 0"),
        (dict(target_sparsity=0.5, criterion="fisher", obs_iterations=5),
         r"obs_iterations=5: only the OBS update uses it; set compensate=True or leave it 0"),
    ],
)
def test_pruner_validation(kwargs, match):
    kwargs.setdefault("end", 3)
    with pytest.raises(ValueError, match=match):
        Pruner(**kwargs)


def test_fisher_criterion_needs_a_complete_finite_estimate():
    pruner = Pruner(0.5, criterion="fisher", schedule="one_shot", start=0)
    pruner.prepare(_net())
    with pytest.raises(ValueError, match="fisher=None: criterion='fisher' needs a Fisher estimate"):
        pruner.step(0)
    partial = {"c1.weight": torch.ones_like(pruner.parameters["c1.weight"])}
    with pytest.raises(KeyError, match=r"no entry for pruned parameters \['c2.weight', 'fc1.weight'\]"):
        pruner.step(0, partial)
    broken = {k: torch.full_like(p, float("nan")) for k, p in pruner.parameters.items()}
    with pytest.raises(ValueError, match="contain NaN"):
        pruner.step(0, broken)
    assert pruner.due(0)  # a failed step does not advance the schedule


def test_step_before_prepare_is_an_error():
    with pytest.raises(RuntimeError, match=r"prepare\(model\) must be called first"):
        Pruner(0.5, end=3).step(0)


# ---------------------------------------------------------------- layer-collapse guard


def _fc1_collapsing_net() -> Net:
    net = _net()
    with torch.no_grad():
        net.fc1.weight.mul_(1e-3)  # fc1 (192 weights) now holds the 192 lowest magnitudes
    return net


@pytest.mark.parametrize(("density", "fc1_kept"), [(0.0, 0), (0.01, 2), (0.1, 20)])  # ceil(d·192)
def test_global_pruner_keeps_each_layer_at_its_floor(density, fc1_kept):
    net = _fc1_collapsing_net()
    magnitudes = net.fc1.weight.detach().abs().clone()
    pruner = Pruner(0.7, criterion="magnitude", schedule="one_shot", start=0, min_layer_density=density)
    pruner.prepare(net)
    pruner.step(0)
    total = sum(p.numel() for p in pruner.parameters.values())
    assert total == 1056 and sum(_pruned_counts(pruner).values()) == round(0.7 * total)
    kept = pruner.masks["fc1.weight"]
    assert int(kept.sum()) == fc1_kept
    if fc1_kept:
        assert magnitudes[kept].min() > magnitudes[~kept].max()  # its top-magnitude weights
    assert (net.fc1.weight[~kept] == 0).all()


@pytest.mark.filterwarnings("ignore:pattern=.2.4.. these layers stay dense")
def test_global_pruner_rejects_unreachable_floors_at_prepare():
    # c1, c2: 432 weights each, fc1: 192; floors at 0.4: 173 + 173 + 77 = 423 > 1056 − round(0.7·1056) = 317
    pruner = Pruner(0.7, criterion="magnitude", schedule="one_shot", start=0, min_layer_density=0.4)
    with pytest.raises(ValueError, match=r"min_layer_density=0.4: the per-layer floors keep 423 of 1056 weights \(3 layers\), but sparsity=0.7 prunes 739 and leaves only 317"):
        pruner.prepare(_net())
    # the guard does not apply per layer or to N:M, so the same density is no error there
    for kwargs in (dict(target_sparsity=0.7, scope="layer"), dict(pattern="2:4")):
        other = Pruner(**kwargs, criterion="magnitude", schedule="one_shot", start=0, min_layer_density=0.4)
        other.prepare(_net())
        other.step(0)
        assert not other.guards_layers


@pytest.mark.parametrize("value", [-0.5, 1.0, 2, "0.01", True])
def test_pruner_rejects_bad_min_layer_density(value):
    with pytest.raises(ValueError, match=r"min_layer_density=.*: must be a float in \[0, 1\)"):
        Pruner(0.5, end=3, min_layer_density=value)


# ---------------------------------------------------------------- damped OBD


def _one_shot_masks(fisher_of, **kwargs) -> dict[str, Tensor]:
    pruner = Pruner(0.6, criterion="fisher", schedule="one_shot", start=0, min_layer_density=0.0, **kwargs)
    net = _net()
    pruner.prepare(net)
    pruner.step(0, fisher_of(pruner.parameters))
    return pruner.masks


def _uneven_fisher(parameters) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(3)
    # spread over four orders of magnitude, so the Fisher and the magnitude rankings disagree
    return {k: 10 ** (4 * torch.rand(p.shape, generator=generator)) for k, p in parameters.items()}


def test_fisher_damping_is_relative_to_the_mean_fisher_and_tends_to_magnitude():
    plain = _one_shot_masks(_uneven_fisher)
    assert all(torch.equal(plain[k], m) for k, m in _one_shot_masks(_uneven_fisher, fisher_damping=0.0).items())
    magnitude = Pruner(0.6, criterion="magnitude", schedule="one_shot", start=0, min_layer_density=0.0)
    magnitude.prepare(_net())
    magnitude.step(0)
    assert any(not torch.equal(plain[k], m) for k, m in magnitude.masks.items())
    # δ = 1e9: F is negligible beside γ = δ·mean F, so the ranking is θ²·γ, i.e. global magnitude
    damped = _one_shot_masks(_uneven_fisher, fisher_damping=1e9)
    assert all(torch.equal(damped[k], m) for k, m in magnitude.masks.items())
    # relative: scaling the Fisher (the Squisher's B·v against an empirical Fisher) changes nothing
    half = _one_shot_masks(_uneven_fisher, fisher_damping=0.5)
    scaled = _one_shot_masks(lambda ps: {k: 1e-6 * f for k, f in _uneven_fisher(ps).items()}, fisher_damping=0.5)
    assert all(torch.equal(half[k], m) for k, m in scaled.items())
    # and it is exactly θ²(F + δ·mean F)/2 with the mean over every pruned weight
    pruner = Pruner(0.6, criterion="fisher", schedule="one_shot", start=0, fisher_damping=0.5)
    pruner.prepare(_net())
    fisher = _uneven_fisher(pruner.parameters)
    gamma = 0.5 * torch.cat([f.flatten() for f in fisher.values()]).double().mean().item()
    for name, score in pruner.scores(fisher).items():
        expected = pruner.parameters[name].detach().square() * (fisher[name] + gamma) / 2
        torch.testing.assert_close(score, expected)
    assert any(not torch.equal(half[k], m) for k, m in plain.items())


@pytest.mark.parametrize("value", ["0.5", True, None])
def test_pruner_rejects_a_fisher_damping_that_is_not_a_number(value):
    with pytest.raises(TypeError, match=r"fisher_damping=.*: must be a float >= 0"):
        Pruner(0.5, end=3, fisher_damping=value)


@pytest.mark.parametrize("value", ["5", True, 2.0, None])
def test_pruner_rejects_obs_iterations_that_are_not_an_integer(value):
    with pytest.raises(TypeError, match=r"obs_iterations=.*: must be an integer >= 0"):
        Pruner(0.5, end=3, criterion="fisher", compensate=True, obs_iterations=value)
