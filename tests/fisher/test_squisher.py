"""The Squisher against each optimizer's recurrence replayed by hand on known gradients."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_fisher.fisher import FisherContext, Squisher

STEPS = 5
BATCH, ACCUMULATE, WORLD = 8, 2, 3
EFFECTIVE = BATCH * ACCUMULATE * WORLD  # 48


def _gradients(step: int, shape: torch.Size, salt: int) -> Tensor:
    generator = torch.Generator().manual_seed(100 * salt + step)
    return torch.randn(shape, generator=generator)


class Tiny(nn.Module):
    """``a`` gets a gradient at every step, ``late`` only from step 3 on, ``never`` never."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3, 4))
        self.late = nn.Parameter(torch.randn(5))
        self.never = nn.Parameter(torch.randn(2))


def _train(optimizer_factory: Callable[..., torch.optim.Optimizer]) -> tuple[Tiny, torch.optim.Optimizer, dict]:
    """Steps with known gradients; returns the per-parameter effective gradients each step saw."""
    torch.manual_seed(0)
    model = Tiny()
    optimizer = optimizer_factory(model.parameters())
    seen: dict[str, list[Tensor]] = {"a": [], "late": []}
    for step in range(1, STEPS + 1):
        optimizer.zero_grad(set_to_none=True)
        model.a.grad = _gradients(step, model.a.shape, 1)
        if step >= 3:
            model.late.grad = _gradients(step, model.late.shape, 2)
        decay = optimizer.param_groups[0].get("weight_decay", 0.0)
        coupled = not isinstance(optimizer, torch.optim.AdamW) and not optimizer.param_groups[0].get(
            "decoupled_weight_decay", False
        )
        for name in seen:
            param = getattr(model, name)
            if param.grad is not None:
                # coupled weight decay adds wd·θ to the gradient before the second moment is updated
                seen[name].append(param.grad + (decay * param.detach() if coupled else 0.0))
        optimizer.step()
    return model, optimizer, seen


def _ema(grads: list[Tensor], decay: float) -> Tensor:
    v = torch.zeros_like(grads[0])
    for g in grads:
        v = decay * v + (1 - decay) * g * g
    return v


def _context(model: Tiny, optimizer: torch.optim.Optimizer, **overrides) -> FisherContext:
    kwargs = dict(batch_size=BATCH, accumulate_grad_batches=ACCUMULATE, world_size=WORLD)
    kwargs.update(overrides)
    return FisherContext(model, dict(model.named_parameters()), optimizer, **kwargs)


ADAM_LIKE = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.95)),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.95), foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.95), fused=True),
    "adam-coupled-decay": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.5),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.5),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.95), foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.95), fused=True),
    "adamw-amsgrad-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.95), amsgrad=True, fused=True),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.95), amsgrad=True),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, betas=(0.9, 0.95)),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, betas=(0.9, 0.95)),
}


@pytest.mark.parametrize("name", list(ADAM_LIKE))
def test_adam_family_is_batch_times_bias_corrected_exp_avg_sq(name):
    model, optimizer, seen = _train(ADAM_LIKE[name])
    fisher = Squisher().diagonal(_context(model, optimizer))

    beta2 = 0.95
    # `a` stepped 5 times, `late` 3 times: the bias correction uses each parameter's own step count.
    torch.testing.assert_close(fisher["a"], EFFECTIVE * _ema(seen["a"], beta2) / (1 - beta2**5))
    torch.testing.assert_close(fisher["late"], EFFECTIVE * _ema(seen["late"], beta2) / (1 - beta2**3))
    assert torch.equal(fisher["never"], torch.full((2,), 1e-30))


def test_amsgrad_reads_the_ema_not_the_running_max():
    model, optimizer, _ = _train(ADAM_LIKE["adam-amsgrad"])
    state = optimizer.state[model.a]
    assert not torch.equal(state["max_exp_avg_sq"], state["exp_avg_sq"])  # else the test proves nothing
    fisher = Squisher(scale_by_batch_size=False, bias_correction=False).diagonal(_context(model, optimizer))
    torch.testing.assert_close(fisher["a"], state["exp_avg_sq"])


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_is_batch_times_bias_corrected_square_avg(centered):
    model, optimizer, seen = _train(lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.8, centered=centered))
    fisher = Squisher().diagonal(_context(model, optimizer))
    torch.testing.assert_close(fisher["a"], EFFECTIVE * _ema(seen["a"], 0.8) / (1 - 0.8**5))
    torch.testing.assert_close(fisher["late"], EFFECTIVE * _ema(seen["late"], 0.8) / (1 - 0.8**3))


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_adagrad_is_batch_times_mean_squared_gradient(weight_decay):
    model, optimizer, seen = _train(
        lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.7, weight_decay=weight_decay)
    )
    fisher = Squisher().diagonal(_context(model, optimizer))
    torch.testing.assert_close(fisher["a"], EFFECTIVE * torch.stack(seen["a"]).square().mean(0))
    torch.testing.assert_close(fisher["late"], EFFECTIVE * torch.stack(seen["late"]).square().mean(0))
    assert torch.equal(fisher["never"], torch.full((2,), 1e-30))


def test_without_bias_correction_returns_raw_accumulator_times_batch():
    model, optimizer, seen = _train(ADAM_LIKE["adam"])
    fisher = Squisher(bias_correction=False).diagonal(_context(model, optimizer))
    torch.testing.assert_close(fisher["a"], EFFECTIVE * _ema(seen["a"], 0.95))


def test_effective_batch_size_multiplies_batch_accumulation_and_world_size():
    model, optimizer, _ = _train(ADAM_LIKE["adam"])
    unit = Squisher(scale_by_batch_size=False).diagonal(_context(model, optimizer))
    for batch, accumulate, world in [(8, 1, 1), (8, 4, 1), (8, 4, 2), (32, 1, 8)]:
        context = _context(model, optimizer, batch_size=batch, accumulate_grad_batches=accumulate, world_size=world)
        fisher = Squisher().diagonal(context)
        torch.testing.assert_close(fisher["a"], batch * accumulate * world * unit["a"])


def test_parameters_without_state_are_floored_not_nan(caplog):
    model, optimizer, _ = _train(ADAM_LIKE["adam"])
    outsider = nn.Parameter(torch.randn(4))  # not in the optimizer at all
    params = {**dict(model.named_parameters()), "outsider": outsider}
    context = FisherContext(model, params, optimizer, batch_size=BATCH)
    with caplog.at_level(logging.DEBUG, logger="lightning_fisher.fisher.squisher"):
        fisher = Squisher(floor=1e-12).diagonal(context)
    assert torch.equal(fisher["never"], torch.full((2,), 1e-12))
    assert torch.equal(fisher["outsider"], torch.full((4,), 1e-12))
    assert all(torch.isfinite(f).all() and (f > 0).all() for f in fisher.values())
    messages = [r.getMessage() for r in caplog.records if "no Adam state" in r.getMessage()]
    assert len(messages) == 1 and "never" in messages[0] and "outsider" in messages[0]


def test_zero_gradient_entries_are_floored():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model.weight.grad = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    model.bias.grad = torch.zeros(2)
    optimizer.step()
    fisher = Squisher(floor=1e-20).diagonal(FisherContext(model, dict(model.named_parameters()), optimizer, batch_size=1))
    assert fisher["weight"][1].eq(1e-20).all() and fisher["bias"].eq(1e-20).all()
    torch.testing.assert_close(fisher["weight"][0, 0], torch.tensor(1.0))  # v = 0.001·1, corrected by 1/0.001


def test_output_is_float32_on_the_parameter_device_even_for_half_parameters():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    fisher = Squisher().diagonal(FisherContext(model, dict(model.named_parameters()), optimizer, batch_size=4))
    assert fisher["weight"].dtype == torch.float32 and fisher["weight"].shape == model.weight.shape


@pytest.mark.parametrize(
    "factory",
    [lambda p: torch.optim.SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
     lambda p: torch.optim.Adamax(p)],
    ids=["sgd", "sgd-momentum", "adamax"],
)
def test_optimizer_without_second_moment_is_a_clear_error(factory):
    optimizer = factory(nn.Linear(2, 2).parameters())
    name = type(optimizer).__name__
    with pytest.raises(TypeError, match=rf"optimizer={name}: .*keeps none.*EmpiricalFisher.*'Adam', 'AdamW'"):
        Squisher().check(optimizer)
    with pytest.raises(TypeError, match=rf"optimizer={name}"):
        Squisher().diagonal(FisherContext(nn.Linear(2, 2), {}, optimizer, batch_size=1))


def test_check_accepts_supported_optimizers_and_wrappers():
    params = list(nn.Linear(2, 2).parameters())
    for optimizer in [torch.optim.Adam(params), torch.optim.AdamW(params), torch.optim.RMSprop(params),
                      torch.optim.Adagrad(params)]:
        Squisher().check(optimizer)

    class Wrapper:  # like Lightning's LightningOptimizer
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    Squisher().check(Wrapper(torch.optim.Adam(params)))
    with pytest.raises(TypeError, match="optimizer=SGD"):
        Squisher().check(Wrapper(torch.optim.SGD(params, lr=0.1)))


def test_misconfiguration():
    with pytest.raises(ValueError, match=r"floor=0: must be a positive finite number"):
        Squisher(floor=0)
    with pytest.raises(ValueError, match=r"floor=inf: must be a positive finite number"):
        Squisher(floor=float("inf"))
    with pytest.raises(ValueError, match=r"floor=1e-50: must be representable in float32"):
        Squisher(floor=1e-50)
    with pytest.raises(ValueError, match=r"optimizer=None: .*EmpiricalFisher"):
        Squisher().check(None)
    model, optimizer, _ = _train(ADAM_LIKE["adam"])
    with pytest.raises(ValueError, match=r"batch_size=None: .*scale_by_batch_size=False"):
        Squisher().diagonal(_context(model, optimizer, batch_size=None))
    Squisher(scale_by_batch_size=False).diagonal(_context(model, optimizer, batch_size=None))


def test_stateless_and_reads_nothing_but_state():
    assert Squisher.requires_data is False and Squisher.needs_all_reduce is False
    assert Squisher().state_dict() == {}
    assert repr(Squisher()) == "Squisher(floor=1e-30, bias_correction=True, scale_by_batch_size=True)"


def test_called_under_inference_mode_returns_ordinary_tensors():
    model, optimizer, _ = _train(ADAM_LIKE["adam"])
    expected = Squisher().diagonal(_context(model, optimizer))
    with torch.inference_mode():
        fisher = Squisher().diagonal(_context(model, optimizer))
    assert not fisher["a"].is_inference() and not fisher["never"].is_inference()
    torch.testing.assert_close(fisher["a"], expected["a"])
