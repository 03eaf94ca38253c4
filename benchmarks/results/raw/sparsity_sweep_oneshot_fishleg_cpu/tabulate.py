"""Print the tables of ../../sparsity_sweep_oneshot_fishleg_cpu.md from the CSVs beside this file.

File names are oneshot-sSEED.csv (sparsity_sweep --mode oneshot --output); differences in test-accuracy points.
"""

import csv
import math
import pathlib
import statistics as st

METHODS = ["dense", "magnitude_global", "squisher", "empirical", "fishleg", "fishleg_obs"]
TARGETS = ["0.8", "0.9", "0.95", "0.98", "2:4"]

acc: dict[tuple[int, str, str], float] = {}
for path in sorted(pathlib.Path(__file__).parent.glob("oneshot-s*.csv")):
    seed = int(path.stem.rsplit("-s", 1)[1])
    for row in csv.DictReader(path.open()):
        if row["test_acc"]:
            acc[(seed, row["method"], row["target"])] = float(row["test_acc"])
seeds = sorted({seed for seed, _, _ in acc})
print("seeds", seeds)
for seed in seeds:
    print(f"seed {seed}: dense {acc[(seed, 'dense', 'dense')]:.4f}")
    print("| method | " + " | ".join(TARGETS) + " |")
    for method in METHODS[1:]:
        print(f"| {method} | " + " | ".join(f"{acc[(seed, method, t)]:.4f}" for t in TARGETS) + " |")
print("means")
for method in METHODS[1:]:
    print(f"| {method} | " + " | ".join(f"{st.mean(acc[(s, method, t)] for s in seeds):.4f}" for t in TARGETS) + " |")
print("fishleg (no compensation) == empirical on every cell:",
      all(acc[(s, "fishleg", t)] == acc[(s, "empirical", t)] for s in seeds for t in TARGETS))
print("differences, fishleg_obs minus")
for other in ["empirical", "squisher", "magnitude_global"]:
    cells = []
    for t in TARGETS:
        diff = [100 * (acc[(s, "fishleg_obs", t)] - acc[(s, other, t)]) for s in seeds]
        se = st.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        cells.append(" / ".join(f"{x:+.2f}" for x in diff) + f" ({st.mean(diff):+.2f} ± {se:.2f}; ahead {sum(x > 0 for x in diff)} of {len(diff)})")
    print(f"| {other} | " + " | ".join(cells) + " |")
best = []
for t in TARGETS:
    margins = [100 * (acc[(s, "fishleg_obs", t)] - max(acc[(s, m, t)] for m in METHODS[1:-1])) for s in seeds]
    best.append(" / ".join(f"{x:+.2f}" for x in margins) + f" (ahead {sum(x > 0 for x in margins)} of {len(margins)})")
print("| best other on each seed | " + " | ".join(best) + " |")
