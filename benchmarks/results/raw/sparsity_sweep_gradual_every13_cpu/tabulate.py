"""Print the tables of ../../sparsity_sweep_gradual_every13_cpu.md from the CSVs beside this file.

File names are RUN-sSEED.csv (sparsity_sweep --output); test accuracy in points for the differences.
"""

import csv
import math
import pathlib
import statistics as st

runs: dict[tuple[str, int, str], tuple[float, float | None]] = {}
for path in pathlib.Path(__file__).parent.glob("*.csv"):
    name, seed = path.stem.rsplit("-s", 1)
    for row in csv.DictReader(path.open()):
        runs[(name, int(seed), row["target"])] = (float(row["test_acc"]), float(row["train_seconds"]))
# FishLeg Surgeon every epoch on the 355f63f checkout (sparsity_sweep_fishleg_update_every_cpu.md), for the noise floor
for seed, (a95, a98) in enumerate([(0.4029, 0.3772), (0.4046, 0.3798), (0.4021, 0.3741)]):
    runs[("obsep355", seed, "0.95")] = (a95, None)
    runs[("obsep355", seed, "0.98")] = (a98, None)
# At 80/90% one prune an epoch on the 355f63f checkout (sparsity_sweep_gradual_80_90_cpu.md): damped empirical
# OBD, and FishLeg Surgeon learning every 10 steps
for name, rows in {"emp355": [(0.4289, 0.4170), (0.4325, 0.4237), (0.4342, 0.4244)],
                   "obsep355u10": [(0.4275, 0.4167), (0.4298, 0.4194), (0.4328, 0.4220)]}.items():
    for seed, (a80, a90) in enumerate(rows):
        runs[(name, seed, "0.8")] = (a80, None)
        runs[(name, seed, "0.9")] = (a90, None)

GROUPS = {
    ("0.95", "0.98"): (
        ["obs13", "obs13p", "emp13", "sq13", "mag13", "fl13", "obsep", "flep", "obsep355", "fl13fix", "fl13exact", "fl13passes", "emp13re",
         "obsep95p", "empep95"],
        [("obs13", "emp13"), ("obs13p", "emp13"), ("obs13p", "sq13"), ("obs13p", "mag13"), ("obs13p", "obs13"), ("obs13", "sq13"), ("obs13", "mag13"), ("obs13", "fl13"), ("obsep", "flep"),
         ("obs13", "obsep"), ("fl13", "emp13"), ("obsep", "obsep355"), ("fl13fix", "emp13"), ("fl13exact", "emp13"), ("fl13passes", "emp13"), ("emp13re", "emp13"),
         ("obsep95p", "empep95"), ("obsep95p", "obsep"), ("obs13p", "obsep95p"), ("emp13", "empep95")],
    ),
    ("0.8", "0.9"): (
        ["obs13m", "emp13m", "fl13m", "obsepm", "empep", "emp355", "obsep355u10",
         "obs13mp", "obsepmp", "empepm"],
        [("obs13m", "emp13m"), ("obs13m", "fl13m"), ("fl13m", "emp13m"), ("obsepm", "emp355"),
         ("obsepm", "obsep355u10"), ("empep", "emp355"),
         ("obs13mp", "emp13m"), ("obs13mp", "obs13m"), ("obsepmp", "empepm"),
         ("obsepmp", "obsepm"), ("empepm", "emp355"), ("obs13mp", "obsepmp")],
    ),
}

for targets, (names, pairs) in GROUPS.items():
    seeds = sorted({seed for name, seed, _ in runs if name == names[0]})
    if not seeds:
        continue
    print("seeds", seeds)
    for target in targets:
        print("target", target)
        for name in names:
            values = [runs.get((name, seed, target), (None,))[0] for seed in seeds]
            known = [v for v in values if v is not None]
            cells = " ".join("  n/a " if v is None else f"{v:.4f}" for v in values)
            print(f"  {name:8s} {cells}", f"mean {st.mean(known):.4f}" if known else "")
        for a, b in pairs:
            diff = [100 * (runs[(a, s, target)][0] - runs[(b, s, target)][0])
                    for s in seeds if (a, s, target) in runs and (b, s, target) in runs]
            if not diff:
                continue
            se = st.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            print(f"  {a}-{b}: " + " / ".join(f"{x:+.2f}" for x in diff)
                  + f" ({st.mean(diff):+.2f} ± {se:.2f}; ahead {sum(x > 0 for x in diff)} of {len(diff)})")
    for name in names:
        seconds = [v[1] for k, v in runs.items() if k[0] == name and k[2] in targets and v[1] is not None]
        if seconds:
            print(f"{name} mean train s {round(st.mean(seconds))} over {len(seconds)} runs")
