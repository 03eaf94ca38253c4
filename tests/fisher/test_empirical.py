"""EmpiricalFisher against a plain per-sample autograd loop, and what it must leave untouched."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_fisher.fisher import EmpiricalFisher, FisherContext

BACKENDS = ["vmap", "loop"]


def _pruned(net) -> dict:
    return {"conv.weight": net.conv.weight, "fc.weight": net.fc.weight}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_equals_per_sample_backward_loop(small_net, small_data, make_batches, reference, bn_mode, backend):
    # 13 samples from batches of 8 (a partial second batch), chunks of 3 (a partial last chunk).
    batches = make_batches(small_data, 8)
    context = FisherContext(small_net, _pruned(small_net), batches=batches, loss_fn=F.cross_entropy)
    fisher = EmpiricalFisher(num_samples=13, chunk_size=3, bn_mode=bn_mode, backend=backend).diagonal(context)
    expected = reference(small_net, _pruned(small_net), batches(), 13, bn_mode)
    assert set(fisher) == {"conv.weight", "fc.weight"}
    for name in expected:
        assert fisher[name].dtype == torch.float32
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-9)


def test_eval_and_train_modes_differ(small_net, small_data, make_batches):
    # Guards the test above: if the two modes agreed, it could not tell them apart.
    context = FisherContext(small_net, _pruned(small_net), batches=make_batches(small_data, 8), loss_fn=F.cross_entropy)
    eval_mode = EmpiricalFisher(num_samples=16, bn_mode="eval").diagonal(context)
    train_mode = EmpiricalFisher(num_samples=16, bn_mode="train").diagonal(context)
    assert not torch.allclose(eval_mode["conv.weight"], train_mode["conv.weight"], rtol=1e-2)


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_chunk_size_does_not_change_the_result(small_net, small_data, make_batches, chunk_size):
    context = FisherContext(small_net, _pruned(small_net), batches=make_batches(small_data, 8), loss_fn=F.cross_entropy)
    base = EmpiricalFisher(num_samples=20, chunk_size=64, backend="vmap").diagonal(context)
    other = EmpiricalFisher(num_samples=20, chunk_size=chunk_size, backend="vmap").diagonal(context)
    for name in base:
        torch.testing.assert_close(other[name], base[name], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_uses_the_context_loss(small_net, small_data, make_batches, reference, bn_mode, backend):
    loss_fn = partial(F.cross_entropy, label_smoothing=0.2)
    batches = make_batches(small_data, 10)
    context = FisherContext(small_net, _pruned(small_net), batches=batches, loss_fn=loss_fn)
    fisher = EmpiricalFisher(num_samples=10, bn_mode=bn_mode, backend=backend).diagonal(context)
    expected = reference(small_net, _pruned(small_net), batches(), 10, bn_mode, loss_fn=loss_fn)
    plain = reference(small_net, _pruned(small_net), batches(), 10, bn_mode)
    torch.testing.assert_close(fisher["fc.weight"], expected["fc.weight"], rtol=1e-5, atol=1e-9)
    assert not torch.allclose(fisher["fc.weight"], plain["fc.weight"], rtol=1e-3)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_leaves_parameters_buffers_and_flags_untouched(small_net, small_data, make_batches, bn_mode):
    small_net.fc.eval()  # a per-module flag that differs from its parent's must come back as it was
    flags = {name: m.training for name, m in small_net.named_modules()}
    before = {k: v.clone() for k, v in small_net.state_dict().items()}
    context = FisherContext(small_net, _pruned(small_net), batches=make_batches(small_data, 8), loss_fn=F.cross_entropy)
    EmpiricalFisher(num_samples=16, bn_mode=bn_mode).diagonal(context)
    assert {name: m.training for name, m in small_net.named_modules()} == flags
    after = small_net.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # includes bn.running_mean/var and num_batches_tracked
    assert all(p.grad is None for p in small_net.parameters())


def test_only_context_parameters_are_differentiated(small_net, small_data, make_batches, reference):
    params = {"fc.weight": small_net.fc.weight}
    batches = make_batches(small_data, 8)
    fisher = EmpiricalFisher(num_samples=8).diagonal(
        FisherContext(small_net, params, batches=batches, loss_fn=F.cross_entropy)
    )
    assert set(fisher) == {"fc.weight"}
    torch.testing.assert_close(fisher["fc.weight"], reference(small_net, params, batches(), 8, "eval")["fc.weight"])


def test_runs_under_inference_mode(small_net, small_data, make_batches):
    # Lightning runs validation hooks under torch.inference_mode; the batches may be inference tensors.
    context = FisherContext(small_net, _pruned(small_net), batches=make_batches(small_data, 8), loss_fn=F.cross_entropy)
    expected = EmpiricalFisher(num_samples=8).diagonal(context)
    with torch.inference_mode():
        x, y = small_data
        x, y = x.clone(), y.clone()
        inference_context = FisherContext(small_net, _pruned(small_net), batches=lambda: [(x[:8], y[:8])],
                                          loss_fn=F.cross_entropy)
        fisher = EmpiricalFisher(num_samples=8).diagonal(inference_context)
    torch.testing.assert_close(fisher["fc.weight"], expected["fc.weight"])


def test_short_data_averages_over_what_was_seen_and_warns(small_net, small_data, make_batches, reference, caplog):
    batches = make_batches(small_data, 8)
    context = FisherContext(small_net, _pruned(small_net), batches=batches, loss_fn=F.cross_entropy)
    with caplog.at_level(logging.WARNING, logger="lightning_fisher.fisher.per_sample"):
        fisher = EmpiricalFisher(num_samples=1000).diagonal(context)
    assert "ran out after 20 of num_samples=1000" in caplog.text
    torch.testing.assert_close(fisher["fc.weight"], reference(small_net, _pruned(small_net), batches(), 20, "eval")["fc.weight"])


def test_errors_for_missing_inputs(small_net, small_data, make_batches):
    params = _pruned(small_net)
    with pytest.raises(ValueError, match="batches=None"):
        EmpiricalFisher().diagonal(FisherContext(small_net, params, loss_fn=F.cross_entropy))
    with pytest.raises(ValueError, match="loss_fn=None"):
        EmpiricalFisher().diagonal(FisherContext(small_net, params, batches=make_batches(small_data, 8)))
    with pytest.raises(ValueError, match="yielded no samples"):
        EmpiricalFisher().diagonal(FisherContext(small_net, params, batches=lambda: [], loss_fn=F.cross_entropy))
    with pytest.raises(ValueError, match=r"\['nope.weight'\] are not parameters of the model"):
        EmpiricalFisher().diagonal(
            FisherContext(small_net, {"nope.weight": small_net.fc.weight}, batches=make_batches(small_data, 8),
                          loss_fn=F.cross_entropy)
        )


def test_misconfiguration():
    for kwargs, message in [
        (dict(num_samples=0), r"num_samples=0: must be an integer >= 1"),
        (dict(num_samples=2.5), r"num_samples=2.5: must be an integer >= 1"),
        (dict(chunk_size=0), r"chunk_size=0: must be an integer >= 1, or None"),
        (dict(bn_mode="batch"), r"bn_mode='batch': must be one of \('eval', 'train'\)"),
        (dict(backend="jit"), r"backend='jit': must be one of \('auto', 'vmap', 'loop'\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            EmpiricalFisher(**kwargs)


def test_flags_and_repr():
    assert EmpiricalFisher.requires_data and EmpiricalFisher.needs_all_reduce
    assert EmpiricalFisher().state_dict() == {}
    assert repr(EmpiricalFisher()) == "EmpiricalFisher(num_samples=1024, chunk_size=64, bn_mode='eval', backend='auto')"
