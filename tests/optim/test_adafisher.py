"""AdaFisher / AdaFisherW: the update rule, parameter coverage, accumulation, AMP, compile, checkpoints."""

from __future__ import annotations

import copy
import gc
import pickle
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_fisher.optim as optim_package
from lightning_fisher.optim import AdaFisher, AdaFisherW
from lightning_fisher.optim.factors import min_max


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_all_names_resolve():
    for name in optim_package.__all__:
        assert getattr(optim_package, name) is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr=-1.0"),
        ({"betas": (0.9, 1.0)}, "betas="),
        ({"betas": (0.9,)}, "betas="),
        ({"gamma": 1.0}, "gamma=1.0"),
        ({"damping": 0.0}, "damping=0.0"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
        ({"eps": 0.0}, "eps=0.0"),
        ({"refresh_interval": 0}, "refresh_interval=0"),
        ({"refresh_interval": 2.0}, "refresh_interval=2.0"),
        ({"fallback_lr_scale": 0.0}, "fallback_lr_scale=0.0"),
    ],
)
def test_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaFisher(nn.Linear(2, 2), **kwargs)


def test_parameters_without_a_model_are_rejected():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="model=None: AdaFisher hooks"):
        AdaFisher(layer.parameters())
    with pytest.raises(TypeError, match="model=list"):
        AdaFisher(layer.parameters(), model=[layer])
    with pytest.raises(ValueError, match="not both"):
        AdaFisher(layer, model=nn.Linear(2, 2))


def test_one_step_is_the_papers_update_with_hand_computed_factors():
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    before = layer.weight.detach().clone(), layer.bias.detach().clone()
    optimizer = AdaFisher(layer, lr=0.01, damping=1e-3)
    out = layer(x)
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    grads = layer.weight.grad.clone(), layer.bias.grad.clone()
    optimizer.step()
    h = min_max(torch.cat([x.square().mean(0), torch.ones(1)]))
    s = min_max(6 * out.grad.square().sum(0))
    curvature = s[:, None] * h[None, :] + 1e-3
    # t = 1: the bias-corrected momentum is the gradient itself
    torch.testing.assert_close(layer.weight.detach(), before[0] - 0.01 * grads[0] / curvature[:, :3])
    torch.testing.assert_close(layer.bias.detach(), before[1] - 0.01 * grads[1] / curvature[:, 3])


class _FreeParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4))
        self.b = nn.Parameter(torch.randn(2, 3))

    def forward(self) -> Tensor:
        return (self.a.sin().sum() - 1.0) ** 2 + (self.b * torch.arange(6.0).view(2, 3)).cos().sum()


@pytest.mark.parametrize(
    ("ours", "reference"),
    [
        (partial(AdaFisher, weight_decay=0.1), partial(torch.optim.Adam, weight_decay=0.1)),
        (partial(AdaFisherW, weight_decay=0.1), partial(torch.optim.AdamW, weight_decay=0.1)),
    ],
    ids=["coupled", "decoupled"],
)
def test_parameters_without_factors_follow_adam_exactly(ours, reference):
    torch.manual_seed(0)
    model = _FreeParameters()
    twin = copy.deepcopy(model)
    optimizer, adam = ours(model, lr=0.05, fallback_lr_scale=1.0), reference(twin.parameters(), lr=0.05)
    for _ in range(4):
        for m, opt in ((model, optimizer), (twin, adam)):
            opt.zero_grad()
            m().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_parameters_without_factors_use_adams_scale_of_learning_rate_and_follow_the_schedule():
    torch.manual_seed(0)
    model = _FreeParameters()
    twin = copy.deepcopy(model)
    # AdaFisher's lr 1 (its default) is Adam's 1e-3 for the parameters that get the Adam rule
    optimizer, adam = AdaFisher(model), torch.optim.Adam(twin.parameters(), lr=1e-3)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1) for o in (optimizer, adam)]
    for _ in range(5):
        for m, opt in ((model, optimizer), (twin, adam)):
            opt.zero_grad()
            m().backward()
            opt.step()
        for schedule in schedules:
            schedule.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_decoupled_weight_decay_shrinks_the_weights_outside_the_preconditioner():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    plain, decayed = copy.deepcopy(layer), copy.deepcopy(layer)
    _train(plain, AdaFisherW(plain, lr=0.01, weight_decay=0.0), x, y, 1)
    _train(decayed, AdaFisherW(decayed, lr=0.01, weight_decay=0.5), x, y, 1)
    # θ₁ = θ₀(1 − lr·wd) − lr·m̂/F̃, and the gradient step is the same in both runs
    torch.testing.assert_close(decayed.weight - plain.weight, -0.01 * 0.5 * layer.weight)


class _Mixed(nn.Module):
    """A free parameter registered before any module, an embedding, a PReLU, a Linear, a free bias."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(1))
        self.embed = nn.Embedding(10, 4)
        self.act = nn.PReLU(4)
        self.fc = nn.Linear(4, 3)
        self.head_bias = nn.Parameter(torch.zeros(3))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(self.act(self.embed(tokens).mean(1))) / self.temperature + self.head_bias


def test_every_parameter_trains_and_is_paired_by_identity():
    torch.manual_seed(0)
    model = _Mixed()
    tokens, y = torch.randint(0, 10, (16, 5)), torch.randint(0, 3, (16,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = AdaFisher(model, lr=0.01)
    _train(model, optimizer, tokens, y, 3)
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"
    covered = {n for n, p in model.named_parameters() if optimizer.covers(p)}
    assert covered == {"fc.weight", "fc.bias"}
    assert set(optimizer.factors()) == {"fc"}


def test_a_parameter_shared_by_two_layers_gets_the_adam_rule(caplog):
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second)
    with caplog.at_level("WARNING"):
        optimizer = AdaFisher(model)
    assert "shared by 0, 2" in caplog.text
    assert not optimizer.covers(first.weight)
    assert optimizer.covers(first.bias) and optimizer.covers(second.bias)


def test_param_groups_with_model_keyword_as_a_hydra_partial_factory_is_called():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    factory = partial(AdaFisherW, lr=2e-3)
    optimizer = factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], model=model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-5, 0.0]
    assert all(optimizer.covers(p) for p in model.parameters())
    _train(model, optimizer, torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]), 2)
    assert set(optimizer.factors()) == {"0", "1", "3"}


def test_loss_falls_faster_than_sgd_on_an_ill_conditioned_problem():
    # Inputs with scales from 0.1 to 10 (a condition number of 10⁴ for the first layer): AdaFisher's
    # activation factor rescales every input, SGD has one learning rate for all. 60 steps, batch 64,
    # the best learning rate of each optimizer from a small grid. Measured with the paper's damping 1e-3:
    # AdaFisher 0.528 (lr 1e-2), SGD with momentum 0.815 (lr 0.1); at their common lr 1e-3, 0.970 vs
    # 1.419. With the default damping 0.3 (tuned on ResNet18, where it trains better) the preconditioner
    # counts for less here: 0.699 (lr 0.3; 0.837 at 0.1, 0.858 at 1).
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(512, 20, generator=generator)
    targets = (raw @ torch.randn(20, 5, generator=generator)).argmax(1)
    inputs = raw * torch.logspace(-1, 1, 20)

    def final_loss(make: partial) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
        optimizer = make(model) if make.func is AdaFisher else make(model.parameters())
        batches = torch.Generator().manual_seed(1)
        for _ in range(60):
            index = torch.randint(0, 512, (64,), generator=batches)
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[index]), targets[index]).backward()
            optimizer.step()
        with torch.no_grad():
            return F.cross_entropy(model(inputs), targets).item()

    adafisher = min(final_loss(partial(AdaFisher, lr=lr, damping=1e-3)) for lr in (1e-3, 3e-3, 1e-2))
    sgd = min(final_loss(partial(torch.optim.SGD, lr=lr, momentum=0.9)) for lr in (0.01, 0.03, 0.1, 0.3))
    assert adafisher < 0.8 * sgd, (adafisher, sgd)
    same_lr = final_loss(partial(AdaFisher, lr=1e-3, damping=1e-3))
    assert same_lr < 0.8 * final_loss(partial(torch.optim.SGD, lr=1e-3, momentum=0.9))
    default_damping = min(final_loss(partial(AdaFisher, lr=lr)) for lr in (0.1, 0.3, 1.0))
    assert default_damping < 0.9 * sgd, (default_damping, sgd)


# ------------------------------------------------------------------------------------------ accumulation
def _plain_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 4))


def test_accumulated_micro_batches_equal_one_full_batch(conv_data):
    x, y = conv_data
    full, accumulated = _plain_net(), _plain_net()
    opt_full, opt_accumulated = AdaFisher(full, lr=0.01), AdaFisher(accumulated, lr=0.01)
    for _ in range(2):
        opt_full.zero_grad()
        F.cross_entropy(full(x), y).backward()
        opt_full.step()
        opt_accumulated.zero_grad()
        for part in (slice(0, 4), slice(4, 8)):  # the loss of each micro-batch divided by 2, as Lightning does
            (F.cross_entropy(accumulated(x[part]), y[part]) / 2).backward()
        opt_accumulated.step()
    for name, entry in opt_full.factors().items():
        torch.testing.assert_close(opt_accumulated.factors()[name]["H"], entry["H"])
        torch.testing.assert_close(opt_accumulated.factors()[name]["S"], entry["S"])
    for p, q in zip(full.parameters(), accumulated.parameters()):
        torch.testing.assert_close(p, q)


def test_only_forward_passes_that_are_back_propagated_before_the_step_count(conv_data):
    x, y = conv_data
    reference_net, net = _plain_net(), _plain_net()
    reference = AdaFisher(reference_net, lr=0.0)
    F.cross_entropy(reference_net(x[4:]), y[4:]).backward()
    reference.step()
    optimizer = AdaFisher(net, lr=0.0)
    net(x[:4] * 5)  # a forward that is never back-propagated
    with torch.no_grad():
        net(x * 3)  # a validation-style forward
    F.cross_entropy(net(x[:4] * 7), y[:4]).backward()
    optimizer.zero_grad()  # discards that backward's sums together with its gradients
    F.cross_entropy(net(x[4:]), y[4:]).backward()
    optimizer.step()
    for name, entry in reference.factors().items():
        torch.testing.assert_close(optimizer.factors()[name]["H"], entry["H"])
        torch.testing.assert_close(optimizer.factors()[name]["S"], entry["S"])


def test_refresh_interval_measures_every_nth_step(conv_net, conv_data):
    x, y = conv_data
    optimizer = AdaFisher(conv_net, refresh_interval=3)
    seen = []
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(conv_net(x), y).backward()
        optimizer.step()
        seen.append(optimizer.factors()["fc"]["refreshes"])
    assert seen == [1, 1, 1, 2, 2]


# ------------------------------------------------------------------------------------------ AMP
def _amp_run(scaled: bool, overflow_at: int | None, attach: bool, x: Tensor, y: Tensor) -> tuple[nn.Module, AdaFisher]:
    net = _plain_net()
    optimizer = AdaFisher(net, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000, enabled=scaled)
    if attach:
        optimizer.attach_grad_scaler(scaler)
    for step in range(4):
        optimizer.zero_grad()
        scaler.scale(F.cross_entropy(net(x), y)).backward()
        if step == overflow_at:  # the scaler skips this step and halves its scale
            net[0].weight.grad[0, 0, 0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
    return net, optimizer


def test_a_constant_loss_scale_cancels_in_the_updates(conv_data):
    plain_net, plain = _amp_run(False, None, False, *conv_data)
    scaled_net, scaled = _amp_run(True, None, False, *conv_data)
    for p, q in zip(plain_net.parameters(), scaled_net.parameters()):
        torch.testing.assert_close(p, q)
    for name, entry in plain.factors().items():
        torch.testing.assert_close(scaled.factors()[name]["H"], entry["H"])
        torch.testing.assert_close(scaled.factors()[name]["S"], entry["S"] * 2.0**20)  # the scale squared


def test_skipped_amp_steps_leave_no_trace_and_an_attached_scaler_unscales_s(conv_data):
    x, y = conv_data
    reference_net = _plain_net()
    reference = AdaFisher(reference_net, lr=0.01)
    _train(reference_net, reference, x, y, 3)  # the three steps that are not skipped
    net, optimizer = _amp_run(True, 1, True, x, y)
    assert optimizer.steps == 3
    for name, entry in reference.factors().items():
        got = optimizer.factors()[name]
        assert got["refreshes"] == entry["refreshes"] == 3
        torch.testing.assert_close(got["H"], entry["H"])
        torch.testing.assert_close(got["S"], entry["S"])
    for p, q in zip(reference_net.parameters(), net.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(TypeError, match="scaler=int"):
        optimizer.attach_grad_scaler(3)


# ------------------------------------------------------------------------------------------ compile, copies
def test_torch_compile_gives_the_eager_factors_and_updates(conv_data):
    x, y = conv_data
    eager_net, compiled_net = _plain_net(), _plain_net()
    eager, compiled = AdaFisher(eager_net, lr=0.01), AdaFisher(compiled_net, lr=0.01)
    compiled_forward = torch.compile(compiled_net, backend="aot_eager")
    for _ in range(2):
        for forward, optimizer in ((eager_net, eager), (compiled_forward, compiled)):
            optimizer.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            optimizer.step()
    assert set(compiled.factors()) == set(eager.factors()) == {"0", "3"}
    for name, entry in eager.factors().items():
        torch.testing.assert_close(compiled.factors()[name]["S"], entry["S"])
        assert compiled.factors()[name]["refreshes"] == 2
    for p, q in zip(eager_net.parameters(), compiled_net.parameters()):
        torch.testing.assert_close(p, q)


def test_a_discarded_optimizers_hooks_do_nothing(conv_net, conv_data):
    x, y = conv_data
    AdaFisher(conv_net)
    gc.collect()
    assert not conv_net.fc._forward_hooks  # the discarded optimizer's hooks were removed
    optimizer = AdaFisher(conv_net)
    assert len(conv_net.fc._forward_hooks) == 1
    _train(conv_net, optimizer, x, y, 2)
    assert optimizer.factors()["fc"]["refreshes"] == 2
    optimizer.remove_hooks()
    assert not conv_net.fc._forward_hooks
    _train(conv_net, optimizer, x, y, 1)
    assert optimizer.factors()["fc"]["refreshes"] == 2  # no hooks: the last factors are kept


def test_copies_of_the_model_do_not_feed_the_optimizer(conv_data):
    x, y = conv_data
    net = _plain_net()  # torch layers only, so the model pickles by name
    optimizer = AdaFisher(net)
    _train(net, optimizer, x, y, 1)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        F.cross_entropy(clone(x), y).backward()
    optimizer.step()  # the copies' backward passes measured nothing for this optimizer
    assert optimizer.factors()["3"]["refreshes"] == 1


def test_functorch_transforms_are_ignored(conv_net, conv_data):
    x, y = conv_data
    optimizer = AdaFisher(conv_net)
    conv_net.eval()
    params = {n: p.detach() for n, p in conv_net.named_parameters()}

    def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = torch.func.functional_call(conv_net, p, (xi[None],))
        return F.cross_entropy(logits, yi[None])

    torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    optimizer.step()
    assert optimizer.factors() == {}


# ------------------------------------------------------------------------------------------ checkpoints
def test_state_dict_round_trip_continues_exactly(conv_net, conv_data):
    x, y = conv_data
    optimizer = AdaFisherW(conv_net, lr=0.01, refresh_interval=2)
    _train(conv_net, optimizer, x, y, 3)
    state = copy.deepcopy(optimizer.state_dict())
    resumed_net = copy.deepcopy(conv_net)
    resumed = AdaFisherW(resumed_net, lr=0.01, refresh_interval=2)
    resumed.load_state_dict(state)
    assert resumed.steps == 3
    _train(conv_net, optimizer, x, y, 2)
    _train(resumed_net, resumed, x, y, 2)
    for p, q in zip(conv_net.parameters(), resumed_net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for name, entry in optimizer.factors().items():
        assert resumed.factors()[name]["refreshes"] == entry["refreshes"] == 3  # steps 1, 3, 5
        torch.testing.assert_close(resumed.factors()[name]["S"], entry["S"], rtol=0, atol=0)


def test_loading_the_state_of_another_model_or_optimizer_is_an_error():
    def model(hidden: int) -> nn.Module:
        return nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    source = model(4)
    optimizer = AdaFisher(source)
    _train(source, optimizer, torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), 1)
    other = model(5)  # same number of tensors, different sizes
    with pytest.raises(ValueError, match=r"0: saved factor sizes \(4, 4\) != \(4, 5\)"):
        AdaFisher(other).load_state_dict(optimizer.state_dict())
    adam = torch.optim.Adam(source.parameters())
    with pytest.raises(ValueError, match="not an AdaFisher state"):
        AdaFisher(source).load_state_dict(adam.state_dict())
