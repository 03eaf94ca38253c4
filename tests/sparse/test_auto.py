import json

import pytest
import torch
from torch import nn

from lightning_fisher.sparse import choose_backend, layer_key, load_measurements, pick_backend


def _entry(batch, dense, triton=None, cusparselt=None):
    return {"device": "GPU", "kind": "linear", "shape": [64, 64], "pattern": "2:4", "dtype": "float16",
            "batch": batch, "ms": {"dense": dense, "triton": triton, "cusparselt": cusparselt}}


def test_picks_the_best_worst_case_backend():
    entries = [_entry(1, 1.0, triton=0.6, cusparselt=0.9), _entry(16, 1.0, triton=0.8, cusparselt=0.7)]
    # triton: worst 1/0.8 = 1.25; cusparselt: worst 1/0.9 = 1.11
    backend, reason = pick_backend(entries)
    assert backend == "triton" and "1.25x" in reason


def test_keeps_dense_when_any_measured_batch_is_slower():
    entries = [_entry(1, 1.0, triton=0.5), _entry(256, 1.0, triton=1.2)]
    backend, reason = pick_backend(entries)
    assert backend is None and "0.83x" in reason and "kept dense" in reason
    assert pick_backend(entries, batch_size=2)[0] == "triton"  # nearest measured batch: 1
    assert pick_backend(entries, batch_size=100)[0] is None  # nearest on a log scale: 256


def test_a_backend_missing_at_some_batch_is_not_considered():
    entries = [_entry(1, 1.0, triton=0.9, cusparselt=0.5), _entry(16, 1.0, triton=0.9, cusparselt=None)]
    assert pick_backend(entries)[0] == "triton"
    assert pick_backend([_entry(1, 1.0)]) == (None, "auto: no sparse backend measured at batch 1")
    assert pick_backend([])[0] is None


def test_min_speedup_threshold():
    entries = [_entry(1, 1.0, triton=0.98)]
    assert pick_backend(entries)[0] == "triton"
    assert pick_backend(entries, min_speedup=1.05)[0] is None
    with pytest.raises(ValueError, match="batch_size=0"):
        pick_backend(entries, batch_size=0)


def test_cpu_weights_get_the_triton_modules():
    assert choose_backend(nn.Linear(8, 8), 2, 4)[0] == "triton"


def test_layer_keys():
    assert layer_key(nn.Linear(16, 32)) == ("linear", (32, 16))
    assert layer_key(nn.Conv2d(8, 16, 3, stride=2, padding=1)) == ("conv2d", (16, 8, 3, 3, 2, 2, 1, 1, 1, 1))
    with pytest.raises(TypeError):
        layer_key(nn.ReLU())


def test_load_measurements(tmp_path):
    assert isinstance(load_measurements(), list)
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"measurements": [_entry(1, 1.0, triton=0.5)]}))
    assert load_measurements(path)[0]["ms"]["triton"] == 0.5
    with pytest.raises(ValueError, match="missing keys"):
        load_measurements([{"device": "GPU"}])


@pytest.mark.gpu
def test_unmeasured_cuda_layers_stay_dense():
    layer = nn.Linear(24, 8).cuda()
    backend, reason = choose_backend(layer, 2, 4, table=[])
    assert backend is None and "no measurement" in reason
    name = torch.cuda.get_device_name()
    entry = {**_entry(1, 1.0, triton=0.5), "device": name, "shape": [8, 24], "dtype": "float32"}
    assert choose_backend(layer, 2, 4, table=[entry])[0] == "triton"
