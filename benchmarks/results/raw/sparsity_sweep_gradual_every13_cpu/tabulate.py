import pathlib, csv, glob, statistics as st, math, sys
runs = {}
for f in glob.glob(str(pathlib.Path(__file__).parent / "*.csv")):
    name, seed = f.split("/")[-1][:-4].rsplit("-s", 1)
    for r in csv.DictReader(open(f)):
        runs[(name, int(seed), r["target"])] = (float(r["test_acc"]), float(r["train_seconds"]))
# per-epoch controls from benchmarks/results/sparsity_sweep_fishleg_update_every_cpu.md (355f63f)
prev = {("obsep355", 0): (0.4029, 0.3772), ("obsep355", 1): (0.4046, 0.3798), ("obsep355", 2): (0.4021, 0.3741),
        ("empep", 0): (0.4001, 0.3752), ("empep", 1): (0.4068, 0.3766), ("empep", 2): (0.4031, 0.3723)}
for (n, s), (a, b) in prev.items():
    runs[(n, s, "0.95")] = (a, None); runs[(n, s, "0.98")] = (b, None)
names = ["obs13", "fl13", "emp13", "sq13", "mag13", "flep", "obsep", "obsep355", "empep"]
seeds = sorted({k[1] for k in runs if k[0] == "obs13"})
print("seeds", seeds)
for t in ("0.95", "0.98"):
    print("target", t)
    for n in names:
        vals = [runs.get((n, s, t), (None,))[0] for s in seeds]
        ok = [v for v in vals if v is not None]
        print(f"  {n:6s}", " ".join("  n/a " if v is None else f"{v:.4f}" for v in vals), f"mean {st.mean(ok):.4f}" if ok else "")
    for a, b in [("obs13", "fl13"), ("obs13", "emp13"), ("obs13", "sq13"), ("obs13", "mag13"), ("emp13", "sq13"), ("obs13", "obsep"), ("fl13", "flep"), ("emp13", "empep"), ("obsep", "flep"), ("fl13", "emp13"), ("obsep", "obsep355")]:
        d = [100 * (runs[(a, s, t)][0] - runs[(b, s, t)][0]) for s in seeds if (a, s, t) in runs and (b, s, t) in runs]
        if not d: continue
        se = st.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        print(f"  {a}-{b}: " + " / ".join(f"{x:+.2f}" for x in d) + f" ({st.mean(d):+.2f} ± {se:.2f}; ahead {sum(x > 0 for x in d)} of {len(d)})")
for n in names[:7]:
    sec = [v[1] for k, v in runs.items() if k[0] == n and v[1] is not None]
    if sec: print(n, "mean train s", round(st.mean(sec)), len(sec))
