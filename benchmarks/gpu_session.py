"""The GPU benchmarks of the open issues, packed to run on a lent GPU machine (the ``device`` tool) within its limits.

A lent machine is bare, reaches no network, runs one command of at most 10 minutes at a time, keeps
ignored files only while it stays warm (about 30 s after a call), and returns at most 8 files from
``$OUT``. Its image has Python 3.12 with PyTorch, Triton and Lightning but not Hydra or W&B, and the
data sets in ``../shared`` do not travel. This script bridges that, with the standard library only (it
runs before anything is installed there):

here, before the first call (fills ``.gpu/``, which git ignores; name it in the call's ``carry``)::

    python benchmarks/gpu_session.py pack --data cifar10          # wheels for Hydra (+ W&B), the data archive
    python benchmarks/gpu_session.py plan                         # every step: its issue, what it settles

on the device machine, one call (``run`` tool, ``carry: [".gpu"]``)::

    python3 benchmarks/gpu_session.py run tests kernels fishleg_overhead

``run`` installs the carried wheels and the project (nothing the image already has), extracts the
archive, runs the steps one after another (recipe steps side by side with ``--parallel N``) inside a
deadline that leaves time to pack, and writes two files into ``$OUT``: ``session.md`` (the machine,
the versions, one line per step: exit status, seconds, the final metrics) and ``gpu_session.tar.gz``
(every step's log and results: metrics CSVs, sparsity curves, benchmark tables). A recipe step cut by
the deadline keeps its run directory under ``.gpu-runs/`` and resumes from its ``last.ckpt`` (same masks,
same schedule) when the next call on the still-warm machine names it again.

``--smoke`` runs every step at toy size on the CPU (what the tests do): it checks the plumbing, not
the numbers.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["STEPS", "Outcome", "Step", "install", "main", "pack", "parse_args", "plan", "run", "run_steps",
           "step_command"]

ROOT = Path(__file__).resolve().parents[1]
PACK_DIR = ROOT / ".gpu"  # carried to the device machine: wheels and data
# Never carried (a carried path replaces the machine's copy), so that a warm machine keeps it between calls.
RUNS_DIR = ROOT / ".gpu-runs"
SHARED_DATA = ROOT.parent / "shared" / "data"
ARCHIVES = {"cifar10": "cifar10-jpeg.tar.gz", "tinyimagenet": "tiny-imagenet-200-sub100.tar.gz"}
EXTRACTED = {"cifar10": "cifar10", "tinyimagenet": "tiny-imagenet-200"}
# What the device machine's image lacks of the project's requirements, at the versions CI tests here.
CORE_WHEELS = ("hydra-core", "omegaconf", "antlr4-python3-runtime")
WANDB = "wandb"
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on what travels (working tree + carried paths)
PACK_RESERVE_S = 25  # of the deadline, kept back to write session.md and the tarball


@dataclass(frozen=True)
class Step:
    """One unit of GPU work: a command, the issue it serves, and how to run it at toy size on the CPU."""

    name: str
    issue: int
    settles: str
    args: tuple[str, ...]  # a benchmark script and its arguments, or Hydra overrides for a recipe step
    smoke_args: tuple[str, ...]
    kind: str = "script"  # "script" (benchmarks/…, pytest) or "recipe" (lightning_fisher.train)
    data: str | None = None
    needs_cuda: bool = False
    results: tuple[str, ...] = field(default_factory=tuple)  # files (relative to the repository) to keep
    limit_s: float | None = None  # cut after this long, so that one slow step leaves the call to the others
    alone: bool = True  # a script timed alone; False: it measures no time and runs beside the recipes


# Recipe runs: AdamW, cosine, 60 epochs, dense to 10, cubic pruning to 40, fine-tuning to 60 (the gradual
# recipes' budget). The OBD baselines take the damping measured best on the CPU proxy (fisher_damping=1).
_DAMPED = ("++pruning.fisher_damping=1.0",)
# A recipe at toy size: every epoch, prune, checkpoint and the test pass happen, in seconds.
_RECIPE_SMOKE = ("trainer=cpu", "++model.width=4", "++data.max_per_class=4", "++data.batch_size=8",
                 "trainer.max_epochs=3", "pruning.start_epoch=1", "pruning.end_epoch=2",
                 "++trainer.limit_train_batches=3", "++trainer.limit_val_batches=2", "++trainer.limit_test_batches=2",
                 "++trainer.precision=bf16-mixed")  # the GPU recipes' precision: autocast runs on the CPU too
# Settings that set the cost of a run: (full size, toy size); a full size of None keeps the recipe's value.
_FISHLEG_SIZES = {"++fisher.pretrain_steps": (None, 2), "fisher.diagonal_source.num_samples": (None, 8)}
_EMPIRICAL_SIZES = {"++fisher.num_samples": (1024, 8)}


def _recipe(name: str, issue: int, settles: str, data: str, overrides: tuple[str, ...],
            sizes: dict[str, tuple[int | None, int]] | None = None) -> Step:
    sizes = sizes or {}
    full = overrides + tuple(f"{key}={big}" for key, (big, _) in sizes.items() if big is not None)
    smoke = overrides + tuple(f"{key}={small}" for key, (_, small) in sizes.items()) + _RECIPE_SMOKE
    return Step(name, issue, settles, full, smoke, kind="recipe", data=data)


_RECIPE_STEPS = [
    _recipe("fishleg95", 4, "FishLeg Surgeon at 95% on the full CIFAR ResNet18 (goal: >= 84% top-1)", "cifar10",
            ("recipe=cifar10_resnet18_fishleg95",), _FISHLEG_SIZES),
    _recipe("fishleg98", 4, "FishLeg Surgeon at 98%, same schedule", "cifar10",
            ("recipe=cifar10_resnet18_fishleg95", "pruning.target_sparsity=0.98",
             "task_name=cifar10_resnet18_fishleg98"),
            _FISHLEG_SIZES),
    _recipe("empirical95", 4, "damped empirical-Fisher OBD at 95%, same schedule", "cifar10",
            ("recipe=cifar10_resnet18_gradual95", "fisher=empirical", *_DAMPED), _EMPIRICAL_SIZES),
    _recipe("squisher95", 3, "damped Squisher OBD at 95%, same schedule", "cifar10",
            ("recipe=cifar10_resnet18_gradual95", *_DAMPED)),
    _recipe("magnitude95", 3, "global magnitude at 95%, same schedule", "cifar10",
            ("recipe=cifar10_resnet18_gradual95", "++pruning.criterion=magnitude")),
    _recipe("empirical98", 4, "damped empirical-Fisher OBD at 98%, same schedule", "cifar10",
            ("recipe=cifar10_resnet18_gradual98", "fisher=empirical", *_DAMPED), _EMPIRICAL_SIZES),
    _recipe("squisher98", 3, "damped Squisher OBD at 98%, same schedule", "cifar10",
            ("recipe=cifar10_resnet18_gradual98", *_DAMPED)),
    _recipe("magnitude98", 3, "global magnitude at 98%, same schedule", "cifar10",
            ("recipe=cifar10_resnet18_gradual98", "++pruning.criterion=magnitude")),
    _recipe("tinyimagenet80", 3, "Squisher OBD at 80% on the TinyImageNet subset", "tinyimagenet",
            ("recipe=tinyimagenet_resnet18_gradual80",)),
    _recipe("tinyimagenet80_fishleg", 4, "FishLeg Surgeon at 80% on the TinyImageNet subset", "tinyimagenet",
            ("recipe=tinyimagenet_resnet18_gradual80", "fisher=fishleg", "++pruning.compensate=true",
             "task_name=tinyimagenet_resnet18_fishleg80"), {**_FISHLEG_SIZES, "++fisher.pretrain_steps": (100, 2)}),
]


STEPS: dict[str, Step] = {
    step.name: step
    for step in [
        Step("tests", 5, "the sparse tests on the GPU: every kernel test compiled (not interpreted), with the "
             "GPU-only ones (bf16, cuSPARSELt, auto)",
             ("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/sparse"),
             ("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/pruning/test_masks.py"), limit_s=300,
             alone=False),
        Step("kernels", 5, "2:4 kernels vs cuBLAS/cuDNN and cuSPARSELt per layer and end to end; the `auto` table",
             ("benchmarks/kernels.py", "--write-table"), (), needs_cuda=True,
             results=("lightning_fisher/sparse/measured.py",)),
        Step("kernels_linear", 5, "only part (b), the Linear shapes, where the small-batch gemv kernel is the "
             "candidate for the >= 1.5x goal at batch <= 16 (24 of the 90 rows `kernels` timed in 445 s; merges "
             "into the `auto` table)",
             ("benchmarks/kernels.py", "--parts", "linear", "--write-table"), (), needs_cuda=True,
             results=("lightning_fisher/sparse/measured.py",)),
        Step("fishleg_overhead", 4, "FishLeg's update time and Q's memory per conv form, as ratios to a dense step",
             ("benchmarks/fishleg_overhead.py", "--width", "64", "--device", "cuda", "--batch-size", "128"),
             ("benchmarks/fishleg_overhead.py", "--width", "4", "--batch-size", "4", "--repeats", "1")),
        Step("pruning_overhead", 3, "FisherPruning + SparsityMonitor overhead on a full-size GPU step (goal < 2%)",
             ("benchmarks/pruning_overhead.py", "--width", "64", "--accelerator", "gpu", "--steps-per-epoch", "100",
              "--repeats", "3"),
             ("benchmarks/pruning_overhead.py", "--width", "4", "--batch-size", "8", "--steps-per-epoch", "3",
              "--epochs", "3", "--prune-start", "1", "--prune-end", "2", "--repeats", "1", "--warmup", "1")),
        Step("fisher_cost", 3, "seconds for the full ResNet18's Fisher diagonal: Squisher vs per-sample estimators",
             ("benchmarks/fisher_cost.py", "--device", "cuda"),
             ("benchmarks/fisher_cost.py", "--device", "cpu", "--width", "4", "--num-samples", "8",
              "--batch-size", "8")),
        Step("oneshot_sweep", 4, "one-shot (no fine-tuning) full-size sweep, every method, 80/90/95/98% and 2:4",
             ("benchmarks/sparsity_sweep.py", "--mode", "oneshot", "--width", "64", "--max-per-class", "0",
              "--accelerator", "gpu", "--precision", "bf16-mixed", "--epochs", "30",
              "--sparsities", "0.8,0.9,0.95,0.98",
              "--patterns", "2:4", "--fisher-damping", "1", "--fishleg-relative-damping", "--fishleg-damping", "1",
              "--fishleg-fvp", "ggn", "--fishleg-lr", "1e-3", "--fishleg-refresh", "--fishleg-diagonal", "empirical",
              "--fisher-samples", "1024", "--output", ".gpu-runs/oneshot_sweep.csv"),
             ("benchmarks/sparsity_sweep.py", "--mode", "oneshot", "--width", "4", "--max-per-class", "4",
              "--epochs", "1",
              "--sparsities", "0.9", "--methods", "magnitude_global,fishleg_obs", "--fishleg-pretrain", "2",
              "--fisher-samples", "8", "--output", ".gpu-runs/oneshot_sweep.csv"),
             data="cifar10", results=(".gpu-runs/oneshot_sweep.csv",)),
        *_RECIPE_STEPS,
    ]
}


def step_command(step: Step, smoke: bool, data_root: Path) -> list[str]:
    """The argv of ``step``: a recipe run in ``.gpu-runs/<name>`` (resumed from its last checkpoint), or a script."""
    args = list(step.smoke_args if smoke else step.args)
    if step.kind == "script":
        if step.data is not None:
            args += ["--data-dir", str(data_root / EXTRACTED[step.data])]
        return [sys.executable, *args]
    run_dir = RUNS_DIR / step.name
    command = [sys.executable, "-m", "lightning_fisher.train", *args,
               f"data.data_dir={data_root / EXTRACTED[step.data]}", f"hydra.run.dir={run_dir}", "logger=csv",
               "callbacks.rich_progress_bar=null", "++trainer.enable_progress_bar=false"]
    if not smoke:
        command.append("trainer=gpu")
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and not (run_dir / "DONE").exists():
        command.append(f"ckpt_path={last}")
    return command


# ----------------------------------------------------------------------------------------------- here


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-qq", *args], check=True, stdout=subprocess.DEVNULL)


def _device_platform() -> list[str]:
    tags = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    return ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *(arg for tag in tags for arg in ("--platform", tag))]


def _pinned(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"pack: {name} is not installed in {sys.executable}; run pack with the project's .venv") \
            from None


def _tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def pack(data: str, with_wandb: bool, shared_data: Path = SHARED_DATA) -> None:
    """Fills ``.gpu/``: the wheels the device image lacks (for Python 3.12) and one data archive."""
    wheels = PACK_DIR / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    hydra, omegaconf, antlr = (_pinned(name) for name in CORE_WHEELS)
    _pip("download", "--no-deps", *_device_platform(), "-d", str(wheels), hydra, omegaconf)
    _pip("wheel", "--no-deps", "-w", str(wheels), antlr)  # antlr4 4.9 is published as a pure-Python sdist only
    if with_wandb:  # with its requirements: run installs only those the image lacks
        _pip("download", *_device_platform(), "-d", str(wheels), _pinned(WANDB))
    data_dir = PACK_DIR / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir()
    if data != "none":
        source = shared_data / ARCHIVES[data]
        if not source.is_file():
            raise SystemExit(f"pack --data {data}: {source} not found (the shared data copy: ../shared/data/README.md)")
        shutil.copy2(source, data_dir / source.name)
    total = _tracked_bytes() + _tree_bytes(wheels) + _tree_bytes(data_dir)
    print(f"pack: .gpu/wheels {_tree_bytes(wheels) / 2**20:.1f} MiB, "
          f".gpu/data {_tree_bytes(data_dir) / 2**20:.1f} MiB, with the tracked files {total / 2**20:.1f} MiB "
          f"of the {CARRY_LIMIT // 2**20} MiB a call carries")
    if total > CARRY_LIMIT:
        raise SystemExit(f"pack: {total / 2**20:.1f} MiB is over the device tool's {CARRY_LIMIT // 2**20} MiB: "
                         "leave W&B out (--no-wandb; the recipe steps log to CSV) or pack another archive")


def plan() -> str:
    """The steps as a markdown table: what each settles, for which issue, what it needs."""
    lines = ["| step | issue | settles | needs |", "|---|---|---|---|"]
    for step in STEPS.values():
        needs = ", ".join(filter(None, [step.data and f"--data {step.data}", "CUDA" if step.needs_cuda else ""]))
        lines.append(f"| `{step.name}` | {step.issue} | {step.settles} | {needs or '-'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- on the device


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _wheel_name(path: Path) -> str:
    return path.name.split("-")[0].replace("_", "-").lower()


def install(log: list[str]) -> None:
    """Installs the carried wheels the image lacks (its own versions stay) and the project, editable."""
    wheels = sorted(p for p in (PACK_DIR / "wheels").glob("*.whl") if not _installed(_wheel_name(p)))
    if wheels:
        _pip("install", "--no-index", "--no-deps", *map(str, wheels))
    log.append(f"installed from .gpu/wheels: {', '.join(_wheel_name(p) for p in wheels) or 'nothing'}")
    if not _project_importable():
        _pip("install", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(ROOT))
        log.append("installed the project (editable)")


def _project_importable() -> bool:
    probe = "import lightning_fisher.conf, lightning_fisher, sys; print(lightning_fisher.__file__)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    return result.returncode == 0 and Path(result.stdout.strip()).resolve().is_relative_to(ROOT)


def extract(data: str, data_root: Path, smoke: bool) -> None:
    if (data_root / EXTRACTED[data]).is_dir():
        return
    archive = PACK_DIR / "data" / ARCHIVES[data]
    if not archive.is_file() and smoke:
        archive = SHARED_DATA / ARCHIVES[data]
    if not archive.is_file():
        raise SystemExit(f"run: a step needs --data {data}, but {archive} was not carried: "
                         f"`python benchmarks/gpu_session.py pack --data {data}` here, then carry .gpu")
    data_root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(data_root, filter="data")


def machine_lines() -> list[str]:
    code = ("import torch, lightning, triton; c = torch.cuda.is_available(); "
            "print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), lightning {lightning.__version__}, "
            "triton {triton.__version__}; ' + (torch.cuda.get_device_name() if c else 'no CUDA device'))")
    versions = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [f"- host: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
             f"- {(versions.stdout.strip() or versions.stderr.strip() or 'no version report').splitlines()[-1]}"]
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        lines.append(f"- nvidia-smi: {smi.stdout.strip()}")
    return lines


def _epochs_validated(run_dir: Path) -> int:
    """How many distinct epochs have a ``val/acc`` in the run's CSV logs (every version: resumed calls)."""
    epochs = set()
    for metrics in run_dir.glob("csv/version_*/metrics.csv"):
        with metrics.open() as handle:
            epochs.update(row["epoch"] for row in csv.DictReader(handle) if row.get("val/acc") and row.get("epoch"))
    return len(epochs)


def _final_metrics(run_dir: Path) -> str:
    """The last value of each test/ and val/acc metric in the run's CSV log, e.g. ``test/acc=0.8512``."""
    values: dict[str, str] = {}
    for metrics in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with metrics.open() as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if value and (key.startswith("test/") or key in ("val/acc", "epoch")):
                        values[key] = value
    return ", ".join(f"{key}={float(value):.4g}" for key, value in sorted(values.items()))


@dataclass
class Outcome:
    """How one step of a call ended: a row of ``session.md``."""

    name: str
    status: str
    ok: bool
    seconds: float = 0.0
    details: str = "-"

    def row(self) -> str:
        return f"| `{self.name}` | {self.status} | {self.seconds:.0f} | {self.details} |"


@dataclass
class _Running:
    step: Step
    process: subprocess.Popen
    log_path: Path
    started: float
    epochs_before: int = 0  # a recipe's epochs validated before this call


def _start(step: Step, smoke: bool, data_root: Path, logs: Path) -> _Running:
    command = step_command(step, smoke, data_root)
    log_path = logs / f"{step.name}.log"
    with log_path.open("a") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        # a session of its own, so that the deadline stops the step's children (DataLoader workers) too
        process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    epochs = _epochs_validated(RUNS_DIR / step.name) if step.kind == "recipe" else 0
    return _Running(step, process, log_path, time.monotonic(), epochs)


def _stop(job: _Running) -> None:
    os.killpg(job.process.pid, signal.SIGTERM)
    try:
        job.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(job.process.pid, signal.SIGKILL)
        job.process.wait()


def _finish(job: _Running, cut: str | None) -> Outcome:
    step, seconds, code = job.step, time.monotonic() - job.started, job.process.returncode
    ok = cut is None and code == 0
    status = "ok" if ok else f"exit {code}"
    details = f"see {job.log_path.name}"
    if step.kind == "recipe":
        run_dir = RUNS_DIR / step.name
        if ok:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "DONE").touch()
        if cut:
            status = f"cut at {cut}: name it again on the warm machine to resume from last.ckpt"
        details = _final_metrics(run_dir) or "-"
        done = _epochs_validated(run_dir) - job.epochs_before
        if done > 0:  # what a step costs, to plan calls: the start-up (data, checkpoint) is included
            details += f"; {done} epochs in this call, {seconds / done:.1f} s each"
    elif cut:
        status = f"cut at {cut}"
    return Outcome(step.name, status, ok, seconds, details)


def _can_start(queue: list[Step], running: list[_Running], parallel: int) -> bool:
    """Whether ``queue[0]`` may start now: a timed script only with nothing else running, and nothing beside it;
    the recipes ``parallel`` at a time, with the untimed scripts (the tests) beside them."""
    if not queue or any(_timed(job.step) for job in running):
        return False
    step = queue[0]
    if _timed(step):
        return not running
    if step.kind == "recipe":
        return sum(job.step.kind == "recipe" for job in running) < parallel
    return True


def _timed(step: Step) -> bool:
    return step.kind == "script" and step.alone


def run_steps(steps: Sequence[Step], smoke: bool, deadline_s: float, parallel: int, data_root: Path,
              logs: Path) -> list[Outcome]:
    """Runs ``steps`` until ``deadline_s``: the timed scripts one at a time, then the untimed ones (the tests)
    beside the recipes, which run ``parallel`` at a time."""
    end = time.monotonic() + deadline_s
    outcomes: list[Outcome] = []
    queue = [s for s in steps if _timed(s)] + [s for s in steps if not _timed(s)]
    running: list[_Running] = []
    while queue or running:
        while _can_start(queue, running, parallel) and time.monotonic() < end:
            step = queue.pop(0)
            if step.needs_cuda and smoke:
                outcomes.append(Outcome(step.name, "skipped: needs CUDA (not run by --smoke)", ok=True))
            elif step.kind == "recipe" and (RUNS_DIR / step.name / "DONE").exists():
                outcomes.append(Outcome(step.name, f"done in an earlier call (remove .gpu-runs/{step.name} to run "
                                        "it again)", ok=True, details=_final_metrics(RUNS_DIR / step.name) or "-"))
            else:
                running.append(_start(step, smoke, data_root, logs))
        time.sleep(0.2)
        late = time.monotonic() > end
        for job in list(running):
            cut = None
            if job.process.poll() is None:
                limit = job.step.limit_s
                if late:
                    cut = "the deadline"
                elif limit is not None and time.monotonic() - job.started > limit:
                    cut = f"its {limit:g} s limit"
                else:
                    continue
                _stop(job)
            running.remove(job)
            outcomes.append(_finish(job, cut))
        if late:
            outcomes.extend(Outcome(s.name, "not started: deadline", ok=False) for s in queue)
            queue.clear()
    return outcomes


def run(names: Sequence[str], smoke: bool, deadline_s: float, parallel: int, out: Path, data_root: Path,
        skip_install: bool) -> int:
    steps = [STEPS[name] for name in names]
    started = time.monotonic()
    notes: list[str] = []
    if not skip_install:
        install(notes)
    for data in sorted({s.data for s in steps if s.data}):
        extract(data, data_root, smoke)
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    work = RUNS_DIR / "session"
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    budget = deadline_s - (time.monotonic() - started) - PACK_RESERVE_S
    outcomes = run_steps(steps, smoke, budget, parallel, data_root, logs)
    for step in steps:
        for name in step.results:
            if (ROOT / name).is_file():
                shutil.copy2(ROOT / name, logs / Path(name).name)
        run_dir = RUNS_DIR / step.name
        for path in [*run_dir.glob("csv/version_*/metrics.csv"), *run_dir.glob("csv/version_*/sparsity_curve.*")]:
            shutil.copy2(path, logs / f"{step.name}-{path.parent.name}-{path.name}")
    summary = ["# GPU session" + (" (--smoke: toy sizes on the CPU, plumbing only)" if smoke else ""), "",
               *machine_lines(), *(f"- {note}" for note in notes), "",
               "| step | status | seconds | final metrics |", "|---|---|---|---|",
               *(outcome.row() for outcome in outcomes), ""]
    text = "\n".join(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "session.md").write_text(text)
    shutil.copy2(out / "session.md", logs / "session.md")
    with tarfile.open(out / "gpu_session.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="gpu_session")
    print(text)
    return 0 if all(outcome.ok for outcome in outcomes) else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="here: fill .gpu/ with the wheels and one data archive")
    packing.add_argument("--data", choices=[*ARCHIVES, "none"], default="cifar10")
    packing.add_argument("--no-wandb", dest="wandb", action="store_false",
                         help="leave W&B out: no step needs it (only the whole test suite, run by hand, does)")
    commands.add_parser("plan", help="print the steps")
    running = commands.add_parser("run", help="on the device machine: install, extract, run the steps")
    running.add_argument("steps", nargs="+", help=f"any of: {', '.join(STEPS)}")
    running.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the plumbing only")
    running.add_argument("--deadline", type=float, default=570.0,
                         help="seconds for the whole call (the device tool stops a command at 600)")
    running.add_argument("--parallel", type=int, default=1, help="recipe steps run side by side on the one GPU")
    running.add_argument("--out", type=Path, default=None, help="where session.md and the tarball go (default $OUT)")
    running.add_argument("--data-root", type=Path, default=Path("/tmp/lightning-fisher-data"))
    running.add_argument("--skip-install", action="store_true", help="use the environment as it is")
    args = parser.parse_args(argv)
    if args.command == "run":
        unknown = [name for name in args.steps if name not in STEPS]
        if unknown:
            parser.error(f"unknown steps {unknown}; choose from {list(STEPS)}")
        if len(set(args.steps)) != len(args.steps):
            parser.error(f"a step is named twice: {args.steps}")
        if args.parallel < 1:
            parser.error(f"--parallel {args.parallel}: must be >= 1")
        if args.deadline <= PACK_RESERVE_S:
            parser.error(f"--deadline {args.deadline}: must be over the {PACK_RESERVE_S} s kept to pack the results")
        if args.out is None:
            if "OUT" not in os.environ:
                parser.error("--out is needed where $OUT is not set (the device tool sets it)")
            args.out = Path(os.environ["OUT"])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "pack":
        pack(args.data, args.wandb)
        return 0
    if args.command == "plan":
        print(plan())
        return 0
    return run(args.steps, args.smoke, args.deadline, args.parallel, args.out, args.data_root, args.skip_install)


if __name__ == "__main__":
    sys.exit(main())
