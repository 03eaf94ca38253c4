"""benchmarks/fishleg_overhead.py: its arguments and a tiny run, masked, with the device-read column."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest



@pytest.fixture(scope="module")
def overhead(load_benchmark) -> Iterator[ModuleType]:
    with load_benchmark("fishleg_overhead") as module:
        yield module


@pytest.mark.parametrize("masked", ["-0.1", "1", "1.5"])
def test_masked_outside_zero_to_one_is_refused(overhead: ModuleType, masked: str, capsys) -> None:
    with pytest.raises(SystemExit):
        overhead.parse_args(["--masked", masked])
    assert f"--masked {float(masked)}: must be in [0, 1)" in capsys.readouterr().err


def test_a_masked_run_prints_three_device_reads_per_update(overhead: ModuleType, capsys) -> None:
    overhead.main(["--width", "4", "--batch-size", "4", "--repeats", "1", "--threads", "1", "--masked", "0.5",
                   "--conv-forms", "three_factor"])
    out = capsys.readouterr().out
    assert "50% of each layer's weights masked" in out
    row = next(line for line in out.splitlines() if line.startswith("| three_factor |"))
    reads, calls = [cell.strip() for cell in row.strip().strip("|").split("|")][-2:]
    assert reads == "3 (_local_scalar_dense 3)" and int(calls.replace(",", "")) > 100
