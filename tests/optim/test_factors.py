"""AdaFisher's factors against second moments computed by hand, the EMA, and the normalisation order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fisher.optim import AdaFisher
from lightning_fisher.optim.factors import ema_update_, expand, min_max, preconditioner


def _one_step(module: nn.Module, x: Tensor, **kwargs) -> tuple[AdaFisher, Tensor]:
    """One AdaFisher step on ``module`` with a mean loss; returns the optimizer and ∂loss/∂output."""
    optimizer = AdaFisher(module, **kwargs)
    out = module(x)
    out.retain_grad()
    weights = torch.linspace(-1.0, 1.0, out[0].numel()).reshape(out.shape[1:])
    loss = (out * weights).sin().flatten(1).sum(1).mean() if out.ndim > 1 else (out * weights).sin().sum()
    loss.backward()
    optimizer.step()
    return optimizer, out.grad


def _factors(optimizer: AdaFisher, name: str = "") -> tuple[Tensor, Tensor]:
    entry = optimizer.factors()[name]
    return entry["H"], entry["S"]


def test_linear_factors_are_input_and_per_sample_output_gradient_second_moments():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    optimizer, s = _one_step(layer, x)
    h, s_factor = _factors(optimizer)
    torch.testing.assert_close(h, torch.cat([x.square().mean(0), torch.ones(1)]))
    # n·s_n is sample n's own loss gradient; S = mean_n (n·s_n)² = n·Σ s²
    torch.testing.assert_close(s_factor, ((5 * s) ** 2).mean(0))


def test_linear_on_sequences_counts_tokens_as_positions():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    x = torch.randn(4, 7, 3)
    optimizer, s = _one_step(layer, x)
    h, s_factor = _factors(optimizer)
    torch.testing.assert_close(h, x.square().mean((0, 1)))
    torch.testing.assert_close(s_factor, ((4 * s) ** 2).sum(1).mean(0))


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
        dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, bias=False),
        dict(in_channels=4, out_channels=6, kernel_size=(3, 2), dilation=(1, 2), padding=(1, 0), groups=2),
        dict(in_channels=3, out_channels=2, kernel_size=3, padding=2, padding_mode="reflect"),
        dict(in_channels=3, out_channels=2, kernel_size=(3, 5), padding="same"),
    ],
    ids=["pad1", "stride2-nobias", "grouped-dilated", "reflect", "same"],
)
def test_conv_factors_equal_moments_of_the_unfolded_patches(conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(**conv)
    x = torch.randn(3, conv["in_channels"], 7, 8)
    optimizer, s = _one_step(layer, x)
    h, s_factor = _factors(optimizer)
    # reference: pad as the layer does, unfold into patches, average the squares over samples and positions
    if layer.padding == "same":
        (kh, kw) = layer.kernel_size
        padded = F.pad(x, ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2))
    else:
        ph, pw = layer.padding
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        padded = F.pad(x, (pw, pw, ph, ph), mode=mode)
    patches = F.unfold(padded, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
    expected_h = patches.square().mean((0, 2))
    if layer.bias is not None:
        expected_h = torch.cat([expected_h, torch.ones(1)])
    torch.testing.assert_close(h, expected_h)
    torch.testing.assert_close(s_factor, ((3 * s) ** 2).sum((2, 3)).mean(0))


def test_grouped_conv_pairs_output_channels_with_their_own_group_inputs():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 2, groups=2)
    h = torch.rand(4 * 2 * 2 + 1)
    s = torch.rand(6)
    got = expand(layer, "conv2d", "weight", h, s)
    expected = torch.empty(6, 2, 2, 2)
    for o in range(6):
        group = o // 3
        for j in range(2):
            channel = group * 2 + j
            expected[o, j] = s[o] * h[channel * 4 : channel * 4 + 4].reshape(2, 2)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(expand(layer, "conv2d", "bias", h, s), s * h[-1])


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_factors_use_the_standardised_input(training):
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(3)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    x = torch.randn(4, 3, 5, 5) * 2 + 0.5
    if training:
        x_hat = F.batch_norm(x, None, None, training=True, eps=layer.eps)
    else:
        x_hat = F.batch_norm(x, layer.running_mean.clone(), layer.running_var.clone(), training=False, eps=layer.eps)
    optimizer, s = _one_step(layer, x)
    h, s_factor = _factors(optimizer)
    torch.testing.assert_close(h, x_hat.square().mean((0, 2, 3)))
    torch.testing.assert_close(s_factor, ((4 * s) ** 2).sum((2, 3)).mean(0))
    # the per-feature diagonal form: F_γ = H·S, F_β = S
    torch.testing.assert_close(optimizer.fisher_diagonal(layer.weight), h * s_factor)
    torch.testing.assert_close(optimizer.fisher_diagonal(layer.bias), s_factor)


def test_layernorm_factors_use_the_standardised_input():
    torch.manual_seed(0)
    layer = nn.LayerNorm((2, 3))
    x = torch.randn(4, 5, 2, 3) * 3
    optimizer, s = _one_step(layer, x)
    h, s_factor = _factors(optimizer)
    x_hat = F.layer_norm(x, (2, 3), eps=layer.eps)
    torch.testing.assert_close(h, x_hat.square().mean((0, 1)).flatten())
    torch.testing.assert_close(s_factor, ((4 * s) ** 2).sum(1).mean(0).flatten())


def test_ema_weights_sum_to_one_at_every_refresh():
    average = torch.zeros(3)
    for refresh in range(1, 6):
        ema_update_(average, torch.full((3,), 2.5), 0.8, refresh)
        torch.testing.assert_close(average, torch.full((3,), 2.5))  # a constant input is returned unchanged


def _measure(model: nn.Module, x: Tensor, y: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """One step's factors alone (a fresh optimizer with lr=0, removed afterwards)."""
    probe = AdaFisher(model, lr=0.0)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    probe.step()
    probe.remove_hooks()
    return _factors(probe, name)


def _average(model: nn.Module, batches: list[tuple[Tensor, Tensor]], gamma: float) -> AdaFisher:
    optimizer = AdaFisher(model, lr=0.0, gamma=gamma, damping=1e-3)  # lr=0: every step sees the same weights
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return optimizer


def test_ema_of_two_steps_matches_the_explicit_weights(conv_net, conv_data):
    gamma = 0.8
    x, y = conv_data
    batches = [(x[:4], y[:4]), (x[4:] * 3.0, y[4:])]
    (h1, s1), (h2, s2) = (_measure(conv_net, bx, by, "fc") for bx, by in batches)
    h, s = _factors(_average(conv_net, batches, gamma), "fc")
    # X_2 = (γ(1−γ) X_1 + (1−γ) X_2) / (1 − γ²): weights γ/(1+γ) and 1/(1+γ), which sum to one
    torch.testing.assert_close(h, (gamma * h1 + h2) / (1 + gamma))
    torch.testing.assert_close(s, (gamma * s1 + s2) / (1 + gamma))


def test_min_max():
    torch.testing.assert_close(min_max(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(min_max(torch.full((4,), 7.0)), torch.ones(4))
    # equal up to rounding (a two-class softmax layer's S): no arbitrary {0, 1}
    torch.testing.assert_close(min_max(torch.tensor([0.3488, 0.3488 * (1 + 1e-7)])), torch.ones(2))
    torch.testing.assert_close(min_max(torch.tensor([1.0, 1.0 + 1e-3])), torch.tensor([0.0, 1.0]))


def test_normalisation_is_applied_after_averaging(conv_net, conv_data):
    x, y = conv_data
    stretched = x.clone()
    stretched[:, 0] *= 5.0  # the second step's channel 0 is larger: the minimum and maximum of H move
    batches = [(x, y), (stretched, y.flip(0))]
    (h1, s1), (h2, s2) = (_measure(conv_net, bx, by, "conv1") for bx, by in batches)
    optimizer = _average(conv_net, batches, gamma=0.5)
    h, s = _factors(optimizer, "conv1")
    got = optimizer.preconditioner(conv_net.conv1.weight)
    torch.testing.assert_close(got, preconditioner(conv_net.conv1, "conv2d", "weight", h, s, 1e-3))
    torch.testing.assert_close(got, expand(conv_net.conv1, "conv2d", "weight", min_max(h), min_max(s)) + 1e-3)
    # the reference code's order (normalise each measurement, then average) gives a different F̃;
    # measured: they differ by up to 0.32 here (F̃ lies in [1e-3, 1.001])
    wrong_h = (0.5 * min_max(h1) + min_max(h2)) / 1.5
    wrong_s = (0.5 * min_max(s1) + min_max(s2)) / 1.5
    wrong = expand(conv_net.conv1, "conv2d", "weight", wrong_h, wrong_s) + 1e-3
    assert (got - wrong).abs().max() > 0.05
