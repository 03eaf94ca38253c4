import importlib
import subprocess
import sys

import pytest

import lightning_fisher

CORE = ["lightning_fisher.fisher", "lightning_fisher.pruning", "lightning_fisher.sparse", "lightning_fisher.optim"]


def test_public_api_names_resolve():
    for name in lightning_fisher.__all__:
        assert getattr(lightning_fisher, name) is not None, name


@pytest.mark.parametrize("package", ["lightning_fisher", *CORE, "lightning_fisher.models", "lightning_fisher.data",
                                     "lightning_fisher.callbacks"])
def test_every_module_all_resolves(package):
    module = importlib.import_module(package)
    for name in getattr(module, "__all__", []):
        assert hasattr(module, name), f"{package}.__all__ names {name!r}, which does not exist"


def test_core_does_not_import_lightning_or_hydra():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        + "".join(f"import {m}\n" for m in CORE)
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
