"""benchmarks/kernels.py cannot run without a GPU; its CPU helpers and its exit path are checked here."""


import pytest
import torch

from lightning_fisher.sparse import load_measurements, nm_violation, pick_backend



@pytest.fixture(scope="module")
def bench(load_benchmark):
    with load_benchmark("kernels") as module:
        yield module


def test_resnet18_shapes(bench):
    shapes = bench.resnet18_layer_shapes(width=64, image_size=32)
    labels = [s.label for s in shapes]
    # forward order: 3×3 s1 at 32², then per stage its 3×3 s2 entry conv, the 3×3 s1 convs, the 1×1 s2 shortcut
    assert labels == [
        "conv 64->64 3x3 s1 p1 @32x32",
        "conv 64->128 3x3 s2 p1 @32x32", "conv 128->128 3x3 s1 p1 @16x16", "conv 64->128 1x1 s2 p0 @32x32",
        "conv 128->256 3x3 s2 p1 @16x16", "conv 256->256 3x3 s1 p1 @8x8", "conv 128->256 1x1 s2 p0 @16x16",
        "conv 256->512 3x3 s2 p1 @8x8", "conv 512->512 3x3 s1 p1 @4x4", "conv 256->512 1x1 s2 p0 @8x8",
        "linear 10x512",
    ]
    assert sum(len(s.names) for s in shapes) == 20  # every layer but the 3-channel stem
    assert shapes[0].names == ("layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2")


def test_random_weights_hold_2_4(bench):
    for shape in [(16, 8, 3, 3), (32, 64)]:
        weight = bench.nm_random_weight(shape)
        assert nm_violation(weight, 2, 4) is None
        assert int((weight != 0).sum()) == weight.numel() // 2


def _row(batch, dense, triton, cusparselt=None):
    return {"label": "linear 4096x4096", "kind": "linear", "shape": [4096, 4096], "input_hw": None,
            "pattern": "2:4", "dtype": "float16", "batch": batch, "device": "GPU-X",
            "ms": {"dense": dense, "triton": triton, "cusparselt": cusparselt}, "max_abs_error": {}}


def test_table_text(bench):
    text = bench.format_rows("(b) Linear layers, float16", "GPU-X", [_row(1, 0.02, 0.0125), _row(16, 0.03, 0.04)])
    lines = text.splitlines()
    assert lines[0] == "(b) Linear layers, float16 on GPU-X"
    assert " 1.60x" in lines[3] and lines[3].rstrip().endswith("-")  # no cuSPARSELt time: no ratio
    assert " 0.75x" in lines[4]


def test_linear_kernel_lines(bench):
    rows = [{**_row(1, 0.02, 0.0125), "kernels_ms": {"dot": 0.08, "gemv": 0.0125}}, _row(128, 0.03, 0.04)]
    text = bench.format_linear_kernels(rows)
    assert text.splitlines()[1] == ("  linear 4096x4096 float16 batch 1: dot 0.0800 (0.25x), gemv 0.0125 (1.60x); "
                                    "faster: gemv")
    assert len(text.splitlines()) == 2 and bench.format_linear_kernels([_row(128, 0.03, 0.04)]) == ""


def test_written_table_is_what_auto_reads(bench, tmp_path):
    conv = {**_row(1, 1.0, 2.0), "kind": "conv2d", "shape": [64, 64, 3, 3, 1, 1, 1, 1, 1, 1], "input_hw": [32, 32]}
    old = [{**_row(1, 1.0, 2.0), "device": "GPU-OLD"}, {**_row(1, 1.0, 2.0), "device": "GPU-X"}, conv]
    merged = bench.merge_measurements(old, [_row(1, 0.02, 0.0125), _row(16, 0.03, 0.02)], "GPU-X")
    # the remeasured linear row is replaced; another device's row and this device's unmeasured conv stay
    assert [(e["device"], e["kind"], e["batch"]) for e in merged] == [
        ("GPU-OLD", "linear", 1), ("GPU-X", "conv2d", 1), ("GPU-X", "linear", 1), ("GPU-X", "linear", 16)]
    assert merged[2]["ms"]["triton"] == 0.0125
    merged = [e for e in merged if e["kind"] == "linear"]
    assert "label" not in merged[1] and "max_abs_error" not in merged[1]
    path = tmp_path / "measured.py"
    path.write_text(bench.render_measured_module(merged, ["GPU-OLD", "GPU-X"]))
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    assert namespace["DEVICES"] == ["GPU-OLD", "GPU-X"]
    entries = load_measurements(namespace["MEASUREMENTS"])
    this_gpu = [e for e in entries if e["device"] == "GPU-X"]
    assert pick_backend(this_gpu)[0] == "triton"  # 1.6x and 1.5x


def test_packaged_table_parses():
    for entry in load_measurements():
        assert entry["pattern"] and entry["ms"]["dense"] > 0


def test_args(bench):
    args = bench.parse_args(["--parts", "linear", "--dtypes", "float16", "--batches-linear", "1,16"])
    assert args.parts == ["linear"] and args.dtypes == ["float16"] and args.batches_linear == [1, 16]
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtypes", "float8"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_exits_with_a_message_without_cuda(bench, capsys):
    assert bench.main(["--parts", "linear"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
