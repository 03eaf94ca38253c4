"""The kernels compile for an H100 (sm_90) on this GPU-less machine: Triton's whole pipeline, from the
Python front end through MLIR to PTX and ptxas, in a subprocess with the interpreter off. This catches
errors that the interpreter tests cannot (types, layouts, constexpr use); it runs nothing on a GPU."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import importlib, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lightning_fisher.sparse.format import code_bits
from lightning_fisher.sparse.kernels._triton import use_gather

POINTER = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
GEOMETRY = {"KH": 3, "KW": 3, "STRIDE_H": 2, "STRIDE_W": 2, "PAD_H": 1, "PAD_W": 1, "DIL_H": 1, "DIL_W": 1}
CASES = [  # module, dtype, n, m, tile
    ("nm_linear", "float16", 2, 4, {"HAS_BIAS": True, "BLOCK_B": 16, "BLOCK_R": 64, "BLOCK_K": 128, "GROUP_B": 8}),
    ("nm_linear", "bfloat16", 4, 8, {"HAS_BIAS": False, "BLOCK_B": 64, "BLOCK_R": 128, "BLOCK_K": 64, "GROUP_B": 8}),
    ("nm_linear", "float32", 1, 3, {"HAS_BIAS": False, "BLOCK_B": 32, "BLOCK_R": 64, "BLOCK_K": 64, "GROUP_B": 8}),
    ("nm_linear_grad_input", "float16", 2, 4, {"BLOCK_B": 32, "BLOCK_K": 64, "BLOCK_R": 64, "GROUP_B": 8}),
    ("nm_conv2d", "float16", 2, 4,
     {**GEOMETRY, "HAS_BIAS": True, "BLOCK_P": 64, "BLOCK_CO": 64, "BLOCK_C": 32, "GROUP_P": 8}),
    ("nm_conv2d_grad_input", "bfloat16", 2, 4, {**GEOMETRY, "BLOCK_P": 64, "BLOCK_C": 32, "BLOCK_CO": 64, "GROUP_P": 8}),
]
failures = 0
for name, dtype, n, m, tile in CASES:
    module = importlib.import_module("lightning_fisher.sparse.kernels." + name)
    kernel = getattr(module, "_" + name + "_kernel")
    constexprs = {"SPARSE_N": n, "SPARSE_M": m, "BITS": code_bits(m), "GATHER": use_gather(n, m),
                  "INPUT_PRECISION": "ieee" if dtype == "float32" else "tf32", **tile}
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*u8" if arg == "codes_ptr" else POINTER[dtype]
        else:
            signature[arg] = "i32"
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        print("compiled", name, dtype, f"{n}:{m}", "cubin" in compiled.asm)
    except Exception as error:
        failures += 1
        print("FAILED", name, dtype, f"{n}:{m}", type(error).__name__, str(error)[:3000])
sys.exit(1 if failures else 0)
'''


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("compiled") == 6 and "False" not in result.stdout, result.stdout
