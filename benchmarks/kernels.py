"""Benchmark 3: N:M (2:4) sparse kernels against dense cuBLAS/cuDNN and cuSPARSELt, on one GPU.

In one run, side by side, with CUDA events after warm-up (``triton.testing.do_bench``: median of the
timed runs, the 20th/80th percentiles shown too), in fp16 and bf16:

(a) every distinct Conv2d/Linear shape of the CIFAR ResNet18 (width 64, 32×32 input) at batch 1, 32, 256:
    dense ``F.conv2d``/``F.linear`` (channels_last) vs our Triton kernel vs cuSPARSELt
    (``to_sparse_semi_structured``; for a convolution an NHWC im2col then the sparse GEMM, im2col
    included in its time). The 3-channel stem cannot be 2:4 and is not listed.
(b) Linear layers ``out×in`` = 4096×4096, 11008×4096, 4096×11008 at batch 1, 16, 128, 2048.
(c) end-to-end ResNet18 inference, dense vs 2:4 (``to_sparse`` with the Triton, cuSPARSELt and auto
    backends; auto reads the measurements of (a) from this same run), each side captured in a CUDA graph
    (or wrapped in ``torch.compile`` with ``--compile``): latency at batch 1, throughput at batch 256.

The ratio columns are dense time / sparse time (above 1: the sparse kernel is faster). The ceiling for a
kernel that decompresses in registers is 1.78× (fp16, weight loading dominates) and about 1× when
compute-bound. Prints the device name with every table; ``--write-table`` merges the (a)/(b)
measurements for this device into ``lightning_fisher/sparse/measured.py``, which ``backend="auto"`` reads.

    python benchmarks/kernels.py                      # everything, prints the tables
    python benchmarks/kernels.py --write-table        # ... and updates the auto table
    python benchmarks/kernels.py --parts linear --dtypes float16 --batches-linear 1,16   # a quick look

Needs CUDA and Triton; without a GPU it exits with a message (status 2).
"""

from __future__ import annotations

import argparse
import functools
import platform
import pprint
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fisher.models import ResNet18
from lightning_fisher.sparse import compress, layer_key, to_sparse
from lightning_fisher.sparse.format import from_reduction_matrix, to_reduction_matrix
from lightning_fisher.sparse.functional import im2col_nhwc
from lightning_fisher.sparse.kernels.nm_linear_gemv import GEMV_MAX_BATCH

__all__ = [
    "LINEAR_SHAPES",
    "LayerShape",
    "format_rows",
    "main",
    "merge_measurements",
    "nm_random_weight",
    "parse_args",
    "render_measured_module",
    "resnet18_layer_shapes",
]

PARTS = ("resnet", "linear", "e2e")
LINEAR_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in)
MEASURED_PATH = Path(__file__).resolve().parents[1] / "lightning_fisher" / "sparse" / "measured.py"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LayerShape:
    """One layer to time: ``kind`` "linear" (shape = (out, in)) or "conv2d" (``layer_key`` shape), the
    input's spatial size for a convolution, and the ResNet layers that share it."""

    kind: str
    shape: tuple[int, ...]
    input_hw: tuple[int, int] | None = None
    names: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.kind == "linear":
            return f"linear {self.shape[0]}x{self.shape[1]}"
        out, cin, kh, kw, sh, _, ph, _, _, _ = self.shape
        return f"conv {cin}->{out} {kh}x{kw} s{sh} p{ph} @{self.input_hw[0]}x{self.input_hw[1]}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--dtypes", default="float16,bfloat16", help="comma-separated: float16,bfloat16")
    parser.add_argument("--batches-resnet", default="1,32,256", help="batch sizes for part (a)")
    parser.add_argument("--batches-linear", default="1,16,128,2048", help="batch sizes for part (b)")
    parser.add_argument("--batches-e2e", default="1,256", help="batch sizes for part (c)")
    parser.add_argument("--width", type=int, default=64, help="ResNet18 width (64 = the paper's model)")
    parser.add_argument("--image-size", type=int, default=32, help="input height and width (CIFAR: 32)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, in ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench timed repetitions, in ms")
    parser.add_argument("--compile", action="store_true", help="part (c): torch.compile both sides, no CUDA graph")
    parser.add_argument("--write-table", action="store_true", help=f"merge (a)/(b) into {MEASURED_PATH.name}")
    parser.add_argument("--table-path", type=Path, default=MEASURED_PATH, help="where --write-table writes")
    args = parser.parse_args(argv)
    args.parts = _choices(args.parts, PARTS, "--parts")
    args.dtypes = _choices(args.dtypes, tuple(DTYPES), "--dtypes")
    for name in ("batches_resnet", "batches_linear", "batches_e2e"):
        setattr(args, name, [int(v) for v in getattr(args, name).split(",") if v])
    return args


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise SystemExit(f"{flag}={text!r}: unknown {unknown}; choose from {allowed}")
    return chosen


# --------------------------------------------------------------------------- shapes and weights (no GPU)
def resnet18_layer_shapes(width: int = 64, image_size: int = 32, m: int = 4) -> list[LayerShape]:
    """The distinct Conv2d/Linear shapes of ``ResNet18(width)`` on ``image_size``² inputs, in forward order,
    leaving out layers whose input dimension is not a multiple of ``m`` (the stem). Runs on the meta device."""
    with torch.device("meta"):
        model = ResNet18(num_classes=10, width=width)
    seen: dict[tuple, list[str]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.shape[1] % m == 0:

            def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, name: str = name) -> None:
                kind, shape = layer_key(module)
                hw = tuple(inputs[0].shape[2:]) if kind == "conv2d" else None
                seen.setdefault((kind, shape, hw), []).append(name)

            hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        model.eval()(torch.empty(1, 3, image_size, image_size, device="meta"))
    for hook in hooks:
        hook.remove()
    return [LayerShape(kind, shape, hw, tuple(names)) for (kind, shape, hw), names in seen.items()]


def nm_random_weight(shape: tuple[int, ...], n: int = 2, m: int = 4, seed: int = 0) -> Tensor:
    """A random fp32 CPU weight holding the N:M pattern (magnitude top-n per group, reduction order kh, kw, cin)."""
    generator = torch.Generator().manual_seed(seed)
    fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    weight = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5  # He-scaled: activations stay O(1)
    matrix = to_reduction_matrix(weight)
    groups = matrix.reshape(matrix.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter(2, groups.abs().topk(n, dim=2).indices, True)
    return from_reduction_matrix(groups.masked_fill(~keep, 0.0).reshape(matrix.shape), shape)


# --------------------------------------------------------------------------- table output (no GPU)
def _ratio(dense: float | None, sparse: float | None) -> str:
    return f"{dense / sparse:5.2f}x" if dense and sparse else "   -  "


def _ms(value: float | None) -> str:
    return f"{value:9.4f}" if value else "        -"


def format_rows(title: str, device: str, rows: Sequence[dict]) -> str:
    """A fixed-width table: layer, dtype, batch, the three medians in ms, and the two speed-ups."""
    header = (f"{'layer':<38} {'dtype':<9} {'batch':>5} {'dense ms':>9} {'triton ms':>9} {'cuSPLt ms':>9} "
              f"{'triton':>6} {'cuSPLt':>6}")
    lines = [f"{title} on {device}", header, "-" * len(header)]
    for row in rows:
        ms = row["ms"]
        lines.append(
            f"{row['label']:<38} {row['dtype']:<9} {row['batch']:>5} {_ms(ms['dense'])} {_ms(ms.get('triton'))} "
            f"{_ms(ms.get('cusparselt'))} {_ratio(ms['dense'], ms.get('triton'))} "
            f"{_ratio(ms['dense'], ms.get('cusparselt'))}"
        )
    return "\n".join(lines)


def format_linear_kernels(rows: Sequence[dict]) -> str:
    """For the Linear rows of at most 16 input rows: each Triton kernel's time beside dense, and which one
    ``nm_linear(kernel="auto")`` (the ``triton`` column) picked."""
    lines = ["Triton kernels behind the `triton` column at batch <= 16 (ms; ratio to dense):"]
    for row in rows:
        kernel_ms = row.get("kernels_ms")
        if not kernel_ms:
            continue
        dense = row["ms"]["dense"]
        parts = ", ".join(f"{name} {value:.4f} ({_ratio(dense, value).strip()})" for name, value in kernel_ms.items())
        chosen = min(kernel_ms, key=kernel_ms.__getitem__)
        lines.append(f"  {row['label']} {row['dtype']} batch {row['batch']}: {parts}; faster: {chosen}")
    return "\n".join(lines) if len(lines) > 1 else ""


def merge_measurements(old: Sequence[dict], new: Sequence[dict], device: str) -> list[dict]:
    """``old`` without the entries ``new`` measures again (same device, layer, pattern, dtype and batch), then
    ``new`` (stripped to the keys ``auto`` reads): a run of some ``--parts`` or batches keeps the rest."""
    keep = ("device", "kind", "shape", "input_hw", "pattern", "dtype", "batch", "ms")

    def identity(entry: dict) -> tuple:
        hw = entry.get("input_hw")
        return (entry["device"], entry["kind"], tuple(entry["shape"]), tuple(hw) if hw else None, entry["pattern"],
                entry["dtype"], int(entry["batch"]))

    fresh = [{key: row[key] for key in keep if key in row} | {"device": device} for row in new]
    remeasured = {identity(entry) for entry in fresh}
    return [entry for entry in old if identity(entry) not in remeasured] + fresh


def render_measured_module(entries: Sequence[dict], devices: Sequence[str]) -> str:
    """The source of ``lightning_fisher/sparse/measured.py`` holding ``entries``."""
    header = '''"""Measured speed of the sparse backends per layer shape: the table ``backend="auto"`` reads.

Generated by ``python benchmarks/kernels.py --write-table`` on a GPU; do not edit by hand. Each entry:
``{"device", "kind" ("linear"/"conv2d"), "shape" (see ``auto.layer_key``), "input_hw" (conv only),
"pattern", "dtype", "batch", "ms": {"dense", "triton", "cusparselt" (None: unsupported)}}``.
Empty until a GPU session runs the benchmark: ``auto`` then keeps CUDA layers dense.
"""

from __future__ import annotations

__all__ = ["DEVICES", "MEASUREMENTS"]

'''
    return (header + f"DEVICES: list[str] = {pprint.pformat(sorted(set(devices)), width=110)}\n"
            f"MEASUREMENTS: list[dict] = {pprint.pformat(list(entries), width=110, sort_dicts=False)}\n")


# --------------------------------------------------------------------------- timing (GPU)
def _bench(fn: Callable[[], object], warmup: int, rep: int) -> tuple[float, float, float]:
    from triton.testing import do_bench

    median, low, high = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return median, low, high


def _cusparselt_weight(matrix: Tensor) -> Tensor | None:
    try:
        return torch.sparse.to_sparse_semi_structured(matrix.contiguous())
    except (RuntimeError, ValueError):
        return None  # shape or dtype it does not take


def _time_layer(layer: LayerShape, batch: int, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    from lightning_fisher.sparse import kernels

    weight = nm_random_weight(layer.shape[:4] if layer.kind == "conv2d" else layer.shape).cuda().to(dtype)
    packed = compress(weight, 2, 4)
    semi = _cusparselt_weight(to_reduction_matrix(weight))
    generator = torch.Generator(device="cuda").manual_seed(batch)
    ms: dict[str, float | None] = {}
    spread: dict[str, tuple[float, float]] = {}
    if layer.kind == "linear":
        x = torch.randn(batch, layer.shape[1], device="cuda", dtype=dtype, generator=generator)
        candidates = {
            "dense": lambda: F.linear(x, weight),
            "triton": lambda: kernels.nm_linear(x, packed.values, packed.codes, 2, 4),
            "cusparselt": (lambda: F.linear(x, semi)) if semi is not None else None,
        }
        reference = F.linear(x, weight)
    else:
        out, cin, kh, kw, sh, sw, ph, pw, dh, dw = layer.shape
        x = torch.randn(batch, cin, *layer.input_hw, device="cuda", dtype=dtype, generator=generator)
        x = x.contiguous(memory_format=torch.channels_last)
        weight_cl = weight.contiguous(memory_format=torch.channels_last)
        geometry = ((kh, kw), (sh, sw), (ph, pw), (dh, dw))
        candidates = {
            "dense": lambda: F.conv2d(x, weight_cl, None, (sh, sw), (ph, pw), (dh, dw)),
            "triton": lambda: kernels.nm_conv2d(x, packed.values, packed.codes, 2, 4, (kh, kw), (sh, sw), (ph, pw),
                                                (dh, dw)),
            "cusparselt": (lambda: F.linear(im2col_nhwc(x, *geometry), semi)) if semi is not None else None,
        }
        reference = F.conv2d(x, weight_cl, None, (sh, sw), (ph, pw), (dh, dw))
    errors = {}
    for name, fn in candidates.items():
        if fn is None:
            ms[name] = None
            continue
        result = fn()  # the first call autotunes the Triton kernel
        if name != "dense":
            if name == "cusparselt" and layer.kind == "conv2d":  # (B·HO·WO, CO) → (B, CO, HO, WO)
                batch_, _, ho, wo = reference.shape
                result = result.reshape(batch_, ho, wo, -1).permute(0, 3, 1, 2)
            errors[name] = float((result.float() - reference.float()).abs().max())
        median, low, high = _bench(fn, args.warmup, args.rep)
        ms[name], spread[name] = median, (low, high)
    kernel_ms: dict[str, float] = {}
    if layer.kind == "linear" and batch <= GEMV_MAX_BATCH:  # what nm_linear(kernel="auto") chose between
        for kernel in ("dot", "gemv"):
            run = functools.partial(kernels.nm_linear, x, packed.values, packed.codes, 2, 4, kernel=kernel)
            run()
            kernel_ms[kernel] = _bench(run, args.warmup, args.rep)[0]
    return {"label": layer.label, "kind": layer.kind, "shape": list(layer.shape),
            "input_hw": list(layer.input_hw) if layer.input_hw else None, "pattern": "2:4",
            "dtype": str(dtype).removeprefix("torch."), "batch": batch, "ms": ms, "p20_p80": spread,
            "max_abs_error": errors, "kernels_ms": kernel_ms}


def _masked_resnet(width: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = ResNet18(num_classes=10, width=width)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.shape[1] % 4 == 0:
                module.weight.copy_(nm_random_weight(tuple(module.weight.shape), seed=module.weight.numel()))
    return model.cuda().to(dtype).eval().to(memory_format=torch.channels_last)


def _runner(model: nn.Module, x: Tensor, use_compile: bool) -> tuple[Callable[[], object], str]:
    """A zero-argument callable running ``model`` on ``x``: a CUDA graph replay, or a compiled call."""
    if use_compile:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(x)
        return (lambda: compiled(x)), "torch.compile"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):  # autotuning and the cuSPARSELt weights happen here, before the capture
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        model(x)
    return graph.replay, "CUDA graph"


def _end_to_end(args: argparse.Namespace, dtype: torch.dtype, measured: list[dict], device: str) -> list[str]:
    lines = []
    dense = _masked_resnet(args.width, dtype)
    for batch in args.batches_e2e:
        x = torch.randn(batch, 3, args.image_size, args.image_size, device="cuda", dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            reference = dense(x).float()
        variants: dict[str, nn.Module | str] = {"dense": dense}
        for backend in ("triton", "cusparselt", "auto"):
            try:
                table = [{**row, "device": device} for row in measured]
                variants[backend] = to_sparse(dense, "2:4", backend, table=table, batch_size=batch)
            except ValueError as error:
                variants[backend] = f"unavailable: {error}"
        times: dict[str, float] = {}
        for name, model in variants.items():
            if isinstance(model, str):
                lines.append(f"  {name:<11} {model}")
                continue
            try:
                run, mode = _runner(model, x, args.compile)
                median, low, high = _bench(run, args.warmup, args.rep)
            except Exception as error:  # report and go on: one failing variant must not hide the others
                lines.append(f"  {name:<11} failed: {type(error).__name__}: {error}")
                continue
            times[name] = median
            with torch.no_grad():
                error_max = float((model(x).float() - reference).abs().max())
            sparse_layers = sum(type(m).__name__.startswith("NMSparse") for m in model.modules())
            lines.append(
                f"  {name:<11} batch {batch:>4} {str(dtype).removeprefix('torch.'):<9} {mode:<13} "
                f"{median:8.3f} ms [{low:.3f}, {high:.3f}]  {batch / median * 1e3:10.0f} img/s  "
                f"{_ratio(times.get('dense'), median)} vs dense  sparse layers {sparse_layers:>2}  "
                f"max |logit diff| {error_max:.2e}"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (with Triton): none is available here. "
              "Run it on a GPU machine; nothing was measured or written.", file=sys.stderr)
        return 2
    from lightning_fisher.sparse.kernels import HAS_TRITON, INTERPRET

    if not HAS_TRITON or INTERPRET:
        print("benchmarks/kernels.py needs compiled Triton kernels: install triton and unset TRITON_INTERPRET.",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; python {platform.python_version()}; "
          f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
    measured: list[dict] = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        if "resnet" in args.parts:
            rows = [_time_layer(layer, batch, dtype, args)
                    for layer in resnet18_layer_shapes(args.width, args.image_size) for batch in args.batches_resnet]
            print("\n" + format_rows(f"(a) ResNet18 (width {args.width}) layers, {dtype_name}", device, rows))
            measured += rows
        if "linear" in args.parts:
            rows = [_time_layer(LayerShape("linear", shape), batch, dtype, args)
                    for shape in LINEAR_SHAPES for batch in args.batches_linear]
            print("\n" + format_rows(f"(b) Linear layers, {dtype_name}", device, rows))
            print(format_linear_kernels(rows))
            measured += rows
    worst_error = max((e for row in measured for e in row["max_abs_error"].values()), default=0.0)
    if measured:
        print(f"\nlargest |sparse - dense| over (a)/(b): {worst_error:.3e}")
    if "e2e" in args.parts:
        for dtype_name in args.dtypes:
            print(f"\n(c) ResNet18 (width {args.width}, {args.image_size}x{args.image_size}) inference, "
                  f"{dtype_name} on {device}")
            print("\n".join(_end_to_end(args, DTYPES[dtype_name], measured, device)))
    if args.write_table and measured:
        from lightning_fisher.sparse.measured import DEVICES, MEASUREMENTS

        for row in measured:
            row["device"] = device
        merged = merge_measurements(MEASUREMENTS, measured, device)
        args.table_path.write_text(render_measured_module(merged, [*DEVICES, device]))
        print(f"\nwrote {len(measured)} measurements for {device} to {args.table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
