"""benchmarks/gpu_session.py: every step's command is valid, runs resume, the deadline holds, a --smoke call works."""

from __future__ import annotations

import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from omegaconf import DictConfig, open_dict

from lightning_fisher.callbacks import FisherPruning
from lightning_fisher.train import build  # also registers the config schema

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def session(load_benchmark) -> Iterator[ModuleType]:
    with load_benchmark("gpu_session") as module:
        yield module


@pytest.fixture
def scratch(session: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``.gpu`` and ``.gpu-runs`` moved under ``tmp_path``, so no test writes into the repository."""
    monkeypatch.setattr(session, "PACK_DIR", tmp_path / ".gpu")
    monkeypatch.setattr(session, "RUNS_DIR", tmp_path / ".gpu-runs")
    return tmp_path


def _recipe_overrides(command: list[str]) -> list[str]:
    overrides = command[command.index("lightning_fisher.train") + 1:]
    return [o for o in overrides if not o.startswith(("hydra.run.dir=", "ckpt_path="))]


def _recipe_steps(session: ModuleType) -> list[str]:
    return [name for name, step in session.STEPS.items() if step.kind == "recipe"]


# ------------------------------------------------------------------------------------- the commands
@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
def test_every_recipe_step_composes_to_what_it_says(session: ModuleType, scratch: Path, smoke: bool,
                                                    compose_config: Callable[..., DictConfig]) -> None:
    for name in _recipe_steps(session):
        step = session.STEPS[name]
        cfg = compose_config(*_recipe_overrides(session.step_command(step, smoke, scratch / "data")), fast=False)
        assert cfg.data.data_dir == str(scratch / "data" / session.EXTRACTED[step.data]), name
        assert cfg.trainer.accelerator == ("cpu" if smoke else "gpu"), name
        assert cfg.trainer.precision == "bf16-mixed", name
        assert cfg.callbacks.rich_progress_bar is None and cfg.trainer.enable_progress_bar is False, name
        assert list(cfg.logger) == ["csv"], name
        target = {"95": 0.95, "98": 0.98, "80": 0.8}[next(n for n in ("95", "98", "80") if n in name)]
        assert cfg.pruning.target_sparsity == target, name
        if smoke:
            assert (cfg.trainer.max_epochs, cfg.model.width, cfg.data.max_per_class) == (3, 4, 4), name
        else:  # the gradual recipes' budget, the same for every criterion
            assert (cfg.trainer.max_epochs, cfg.pruning.start_epoch, cfg.pruning.end_epoch) == (60, 10, 40), name
            assert "width" not in cfg.model and "max_per_class" not in cfg.data, name
        fisher = cfg.fisher._target_.rsplit(".", 1)[-1]
        if "fishleg" in name:
            assert fisher == "FishLegFisher" and cfg.pruning.compensate is True, name
            assert cfg.fisher.pretrain_steps == (2 if smoke else 100), name
            assert cfg.fisher.diagonal_source.num_samples == (8 if smoke else 1024), name
        elif name.startswith("empirical"):
            assert fisher == "EmpiricalFisher" and cfg.fisher.num_samples == (8 if smoke else 1024), name
            assert cfg.pruning.fisher_damping == 1.0, name
        elif name.startswith("squisher"):
            assert fisher == "Squisher" and cfg.pruning.fisher_damping == 1.0, name
        elif name.startswith("magnitude"):
            assert cfg.pruning.criterion == "magnitude", name
        else:
            assert name == "tinyimagenet80" and fisher == "Squisher", name
        with open_dict(cfg):  # every object builds (on the CPU: CI has no GPU)
            cfg.trainer.accelerator, cfg.trainer.devices = "cpu", 1
        (pruning,) = [c for c in build(cfg)["callbacks"] if isinstance(c, FisherPruning)]
        assert pruning.pruner.target_sparsity == target and pruning.criterion == cfg.pruning.get("criterion", "fisher")
        assert type(pruning.estimator).__name__ == (fisher if pruning.criterion == "fisher" else "NoneType"), name
        assert pruning.pruner.compensate is ("fishleg" in name), name


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
def test_every_script_step_parses_with_its_script(session: ModuleType, scratch: Path, smoke: bool,
                                                  load_benchmark) -> None:
    for name, step in session.STEPS.items():
        if step.kind != "script" or name == "tests":
            continue
        command = session.step_command(step, smoke, scratch / "data")
        if smoke and not step.smoke_args:
            assert step.needs_cuda, name  # only a CUDA-only step may have no toy version
            continue
        script = Path(command[1])
        assert script.parent == Path("benchmarks") and (BENCHMARKS / script.name).is_file(), name
        with load_benchmark(script.stem, alias=f"benchmark_{script.stem}_for_gpu_session") as module:
            args = module.parse_args(command[2:])
        if step.data:
            assert Path(args.data_dir) == scratch / "data" / session.EXTRACTED[step.data], name
        if not smoke:
            assert getattr(args, "width", 64) == 64, name  # full size: the paper's ResNet18


def test_a_recipe_step_resumes_from_its_last_checkpoint_until_it_is_done(session: ModuleType, scratch: Path) -> None:
    step = session.STEPS["fishleg95"]
    run_dir = session.RUNS_DIR / "fishleg95"
    assert not any(a.startswith("ckpt_path=") for a in session.step_command(step, False, scratch))
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").touch()
    command = session.step_command(step, False, scratch)
    assert f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in command
    assert f"hydra.run.dir={run_dir}" in command
    (run_dir / "DONE").touch()
    assert not any(a.startswith("ckpt_path=") for a in session.step_command(step, False, scratch))


# ------------------------------------------------------------------------------------------ running
def test_a_step_limit_and_the_deadline_stop_steps_and_start_no_other(session: ModuleType, scratch: Path) -> None:
    sleep = ("-c", "import time; time.sleep(60)")
    capped = session.Step("capped", 0, "", sleep, (), limit_s=0.5)
    sleeper = session.Step("sleeper", 0, "", sleep, ())
    after = session.Step("after", 0, "", ("-c", "pass"), ())
    logs = scratch / "logs"
    logs.mkdir()
    started = time.monotonic()
    outcomes = session.run_steps([capped, sleeper, after], smoke=False, deadline_s=2.0, parallel=1,
                                 data_root=scratch, logs=logs)
    assert time.monotonic() - started < 15
    assert [(o.name, o.status, o.ok) for o in outcomes] == [
        ("capped", "cut at its 0.5 s limit", False), ("sleeper", "cut at the deadline", False),
        ("after", "not started: deadline", False)]
    assert 0.5 <= outcomes[0].seconds < 2.0 and outcomes[0].seconds + outcomes[1].seconds >= 2.0
    assert (logs / "sleeper.log").read_text().startswith("$ ")


def test_timed_scripts_run_alone_then_the_tests_and_recipes_side_by_side(
        session: ModuleType, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = ("import sys, time; open(sys.argv[1], 'a').write(f'{time.time()} '); time.sleep(1.0); "
             "open(sys.argv[1], 'a').write(f'{time.time()}')")
    scripts = [session.Step(f"s{i}", 0, "", (), ("-c", stamp, str(scratch / f"s{i}"))) for i in range(2)]
    recipes = [session.Step(f"r{i}", 0, "", (), ("-c", stamp, str(scratch / f"r{i}")), kind="recipe") for i in range(2)]
    untimed = session.Step("u", 0, "", (), ("-c", stamp, str(scratch / "u")), alone=False)  # like `tests`
    # the steps stamp instead of working: the point is the order and the overlap
    monkeypatch.setattr(session, "step_command", lambda step, smoke, data_root: [sys.executable, *step.smoke_args])
    logs = scratch / "logs"
    logs.mkdir()
    outcomes = session.run_steps([*recipes, untimed, *scripts], smoke=True, deadline_s=60, parallel=2,
                                 data_root=scratch, logs=logs)
    assert all(o.ok for o in outcomes), outcomes
    spans = {name: tuple(map(float, (scratch / name).read_text().split())) for name in ("s0", "s1", "r0", "r1", "u")}
    timed_end = spans["s1"][1]
    assert spans["s0"][1] <= spans["s1"][0] and timed_end <= min(spans[name][0] for name in ("r0", "r1", "u"))
    starts, ends = [spans[name][0] for name in ("r0", "r1", "u")], [spans[name][1] for name in ("r0", "r1", "u")]
    assert max(starts) < min(ends)  # the recipes overlapped, and the untimed script ran beside them
    assert all((session.RUNS_DIR / name / "DONE").exists() for name in ("r0", "r1"))


def test_the_tests_step_is_the_only_untimed_script(session: ModuleType) -> None:
    untimed = [s.name for s in session.STEPS.values() if s.kind == "script" and not s.alone]
    assert untimed == ["tests"]


def test_a_smoke_call_runs_a_recipe_and_a_benchmark_and_packs_the_results(
        session: ModuleType, scratch: Path, cifar_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = scratch / "out"
    code = session.main(["run", "--smoke", "--skip-install", "--out", str(out), "--data-root", str(cifar_dir),
                         "squisher95", "fishleg_overhead", "kernels"])
    summary = (out / "session.md").read_text()
    assert code == 0, summary
    assert "| `fishleg_overhead` | ok |" in summary and "| `kernels` | skipped: needs CUDA" in summary
    assert "| `squisher95` | ok |" in summary and "test/acc=" in summary and "; 3 epochs in this call, " in summary
    assert (session.RUNS_DIR / "squisher95" / "DONE").exists()
    with tarfile.open(out / "gpu_session.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"gpu_session/session.md", "gpu_session/squisher95.log", "gpu_session/fishleg_overhead.log",
            "gpu_session/squisher95-version_0-metrics.csv",
            "gpu_session/squisher95-version_0-sparsity_curve.csv"} <= names
    assert sorted(p.name for p in out.iterdir()) == ["gpu_session.tar.gz", "session.md"]  # the tool returns <= 8 files
    # named again: not run twice
    assert session.main(["run", "--smoke", "--skip-install", "--out", str(out), "--data-root", str(cifar_dir),
                         "squisher95"]) == 0
    assert "| `squisher95` | done in an earlier call" in (out / "session.md").read_text()


def test_install_adds_only_what_the_image_lacks(session: ModuleType, scratch: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(session, "_pip", lambda *args: calls.append(args))
    wheels = session.PACK_DIR / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "hydra_core-0.0.1-py3-none-any.whl").touch()  # installed here: the installed version stays
    missing = wheels / "lightning_fisher_absent_package-1.0-py3-none-any.whl"
    missing.touch()
    notes: list[str] = []
    monkeypatch.setattr(session, "_project_importable", lambda: True)
    session.install(notes)
    assert calls == [("install", "--no-index", "--no-deps", str(missing))]
    assert notes == ["installed from .gpu/wheels: lightning-fisher-absent-package"]
    calls.clear()
    monkeypatch.setattr(session, "_project_importable", lambda: False)
    session.install(notes)
    assert calls[-1] == ("install", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(session.ROOT))
    assert session._wheel_name(Path("antlr4_python3_runtime-4.9.3-py3-none-any.whl")) == "antlr4-python3-runtime"


# ------------------------------------------------------------------------------------------ packing
def test_pack_fills_gpu_and_refuses_more_than_a_call_carries(session: ModuleType, scratch: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    wheel_bytes = {"size": 1000}
    calls: list[tuple[str, ...]] = []

    def fake_pip(*args: str) -> None:
        calls.append(args)
        folder = Path(args[args.index("-d" if "-d" in args else "-w") + 1])
        with (folder / f"{args[-1].split('==')[0].replace('-', '_')}-1-py3-none-any.whl").open("wb") as handle:
            handle.truncate(wheel_bytes["size"])

    monkeypatch.setattr(session, "_pip", fake_pip)
    shared = scratch / "shared"
    shared.mkdir()
    (shared / session.ARCHIVES["cifar10"]).write_bytes(b"x" * 100)
    session.pack("cifar10", with_wandb=True, shared_data=shared)
    assert (session.PACK_DIR / "data" / session.ARCHIVES["cifar10"]).read_bytes() == b"x" * 100
    assert [c[0] for c in calls] == ["download", "wheel", "download"]
    assert any(a.startswith("wandb==") for a in calls[-1]) and "--no-deps" not in calls[-1]  # its requirements too
    assert all("--python-version" in c for c in calls if c[0] == "download")
    with pytest.raises(SystemExit, match="tinyimagenet.*not found"):
        session.pack("tinyimagenet", with_wandb=False, shared_data=shared)
    wheel_bytes["size"] = 70 * 2**20
    with pytest.raises(SystemExit, match="over the device tool's 64 MiB.*--no-wandb"):
        session.pack("none", with_wandb=False, shared_data=shared)


# ---------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(("argv", "message"), [
    (["run", "nope"], "unknown steps \\['nope'\\]"),
    (["run", "tests", "tests"], "a step is named twice"),
    (["run", "fishleg95", "--parallel", "0"], "--parallel 0: must be >= 1"),
    (["run", "fishleg95", "--deadline", "10"], "--deadline 10.0: must be over"),
    (["run", "fishleg95"], "--out is needed where \\$OUT is not set"),
])
def test_bad_arguments_are_named(session: ModuleType, argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("OUT", raising=False)
    with pytest.raises(SystemExit):
        session.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_the_plan_names_every_step_and_its_issue(session: ModuleType) -> None:
    table = session.plan()
    for name, step in session.STEPS.items():
        assert f"| `{name}` | {step.issue} |" in table
    assert {step.issue for step in session.STEPS.values()} == {3, 4, 5}
