import importlib
import subprocess
import sys

import pytest

MODULES = [
    "lightning_fisher.sparse",
    "lightning_fisher.sparse.format",
    "lightning_fisher.sparse.functional",
    "lightning_fisher.sparse.modules",
    "lightning_fisher.sparse.convert",
    "lightning_fisher.sparse.auto",
    "lightning_fisher.sparse.measured",
    "lightning_fisher.sparse.kernels",
    "lightning_fisher.sparse.kernels._triton",
    "lightning_fisher.sparse.kernels.nm_linear",
    "lightning_fisher.sparse.kernels.nm_linear_gemv",
    "lightning_fisher.sparse.kernels.nm_linear_grad_input",
    "lightning_fisher.sparse.kernels.nm_conv2d",
    "lightning_fisher.sparse.kernels.nm_conv2d_grad_input",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_resolves(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), name
    for symbol in module.__all__:
        assert hasattr(module, symbol), f"{name}.__all__ names {symbol!r}"


def test_importing_the_package_does_no_kernel_work():
    # the modules and to_sparse import without triton; the kernels (and triton) load on first use
    code = (
        "import sys\n"
        "import lightning_fisher.sparse as s\n"
        "print(sorted(m for m in sys.modules if m.startswith('triton') or '.kernels' in m))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_sparse_and_pruning_do_not_import_each_other():
    code = (
        "import sys\n"
        "import lightning_fisher.sparse, lightning_fisher.sparse.kernels\n"
        "assert not any(m.startswith('lightning_fisher.pruning') for m in sys.modules), 'sparse imported pruning'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
