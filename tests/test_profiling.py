"""HostSyncCounter: which aten calls make the host wait for the device."""

from __future__ import annotations

import torch

from lightning_fisher.profiling import HostSyncCounter


def test_counts_value_reads_and_boolean_indexing_but_not_device_only_work():
    t = torch.arange(6.0)
    mask = t > 2
    with HostSyncCounter() as counter:
        u = (t * 2 + 1).sum()  # stays on the device
        t.index_select(0, torch.tensor([0, 2]))  # integer indices: no data-dependent shape
        torch.where(mask, t, 0.0)
    assert counter.total == 0 and counter.ops >= 5
    with HostSyncCounter() as counter:
        float(u)
        bool(mask.any())
        t[mask]
        t[mask] = 0.0
        t.masked_fill_(mask, 1.0)  # no sync: shape-preserving
        mask.nonzero()
    assert dict(counter.counts) == {"_local_scalar_dense": 2, "index": 1, "index_put_": 1, "nonzero": 1}


def test_ignores_the_tensors_and_devices_it_is_told_to():
    step, other = torch.tensor(3.0), torch.tensor(4.0)
    with HostSyncCounter(ignore=(t for t in [step])) as counter:  # any iterable
        float(step)
        float(other)
    assert counter.total == 1
    with HostSyncCounter(devices=("cuda",)) as counter:
        float(other)  # a CPU read is no sync on a GPU machine
    assert counter.total == 0
