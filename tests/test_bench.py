"""The benchmark runner (fedsparse.bench): suite parsing, resume (of finished runs, and of runs cut
short after a checkpoint), summary statistics, reports.

The resume / summary test runs real tiny runs in process — fedsparse's round loop on a loopback grid
that calls the real ClientApp (no Ray) — and checks the runner's tables against those runs' own
files. The end-to-end test of ``fedsparse bench`` on the smoke suite (Ray, one subprocess per run)
is in the default run (about a minute on 2 idle cores): CI runs the smoke suite.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import SMOKE_BENCH_EXTRA, smoke_bench_command
from loopback import LoopbackGrid, set_task_identity  # tests/ is on sys.path under pytest
from test_compression import loopback_grid  # the in-process grid

from fedsparse import bench
from fedsparse.config import ConfigError
from fedsparse.server import run_server

ROOT = Path(__file__).resolve().parents[1]

TINY_BASE = {
    "num-clients": 4,
    "clients-per-round": 2,
    "rounds": 2,
    "local-steps": 3,
    "batch-size": 16,
    "lr": 0.05,
    "momentum": 0.9,
    "eval-every": 2,
    "eval-batch-size": 5000,
    "wire-bytes": False,
}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """In-process runs build Messages outside a running app (flower-notes, 'Tests without Ray')."""
    set_task_identity(node_id=0)


def _suite(**extra) -> bench.Suite:
    data = {
        "name": "tiny",
        "seeds": [0, 1],
        "base": dict(TINY_BASE),
        "splits": {"iid": {"partition": "iid"}},
        "methods": [
            {"name": "fedavg", "strategy": "fedavg"},
            {"name": "topk", "strategy": "topk", "compress-ratio": 0.05},
        ],
    }
    data.update(extra)
    return bench.parse_suite(data)


class LoopbackRunner:
    """Runs a suite's run in this process (the real round loop and ClientApp, no Ray)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, spec: bench.RunSpec, cfg: dict, run_dir: Path, slot: bench.Slot) -> int:
        self.calls.append(spec.name)
        run_server(loopback_grid(cfg, int(cfg["num-clients"])), cfg, run_dir, show_progress=False)
        return 0


def _never(spec, cfg, run_dir, slot) -> int:
    raise AssertionError(f"{spec.name} should have been skipped")


# ----------------------------------------------------------------------------- suite files


def test_suite_structure_errors_are_named() -> None:
    ok = {"methods": [{"name": "a", "strategy": "fedavg"}]}
    with pytest.raises(ConfigError, match="no methods"):
        bench.parse_suite({})
    with pytest.raises(ConfigError, match="has no 'strategy'"):
        bench.parse_suite({"methods": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="method name 'a/b' is not allowed"):
        bench.parse_suite({"methods": [{"name": "a/b", "strategy": "fedavg"}]})
    with pytest.raises(ConfigError, match="defined twice"):
        bench.parse_suite({"methods": [{"name": "a", "strategy": "fedavg"}] * 2})
    with pytest.raises(ConfigError, match="unknown top-level entries \\['method'\\]"):
        bench.parse_suite({**ok, "method": []})
    with pytest.raises(ConfigError, match="seeds = "):
        bench.parse_suite({**ok, "seeds": [0, -1]})
    with pytest.raises(ConfigError, match="baseline 'fedavg' is not one of the methods"):
        bench.parse_suite({**ok, "baseline": "fedavg"})
    with pytest.raises(ConfigError, match="split 'x'"):
        bench.parse_suite({**ok, "splits": {"x": {"alpha": [1, 2]}}})
    # configuration values are checked per run, before anything starts, and the error names the run
    suite = bench.parse_suite({**ok, "methods": [{"name": "a", "strategy": "topk", "compress-ratio": 2.0}]})
    with pytest.raises(ConfigError, match="run a--default--s0 .*compress-ratio = 2.0"):
        bench.resolve_runs(suite.runs())
    with pytest.raises(ConfigError, match="unknown method 'b'"):
        suite.runs(methods=["b"])


def test_run_overrides_precedence_and_names() -> None:
    suite = bench.parse_suite(
        {
            "seeds": [3, 4],
            "base": {"lr": 0.1, "rounds": 5, "partition": "iid"},
            "splits": {"iid": {}, "dir": {"partition": "dirichlet", "lr": 0.2}},
            "methods": [{"name": "m", "strategy": "fedprox", "lr": 0.3, "seed": 99}],
        }
    )
    suite.extra = {"rounds": 7}
    runs = suite.runs()
    assert [r.name for r in runs] == ["m--iid--s3", "m--iid--s4", "m--dir--s3", "m--dir--s4"]
    r = runs[2].overrides
    assert (r["lr"], r["partition"], r["seed"], r["rounds"], r["strategy"]) == (0.3, "dirichlet", 3, 7, "fedprox")
    assert suite.baseline is None


def test_a_method_may_run_only_some_seeds() -> None:
    suite = bench.parse_suite(
        {
            "seeds": [0, 1, 2],
            "methods": [{"name": "a", "strategy": "fedavg"}, {"name": "b", "strategy": "fedavg", "seeds": [0]}],
        }
    )
    assert [r.name for r in suite.runs()] == [
        "a--default--s0",
        "a--default--s1",
        "a--default--s2",
        "b--default--s0",
    ]
    assert [r.name for r in suite.runs(seeds=[1])] == ["a--default--s1"]
    assert "seeds" not in suite.methods["b"]  # not a configuration key
    with pytest.raises(
        ConfigError, match="method 'b': seeds = \\[5\\]; allowed: a non-empty list of this suite's seeds"
    ):
        bench.parse_suite({"seeds": [0], "methods": [{"name": "b", "strategy": "fedavg", "seeds": [5]}]})


def test_shipped_suites_resolve() -> None:
    for name in ("smoke.toml", "fmnist-lenet5.toml", "combinations.toml", "smartidx.toml"):
        suite = bench.load_suite(ROOT / "experiments" / "suites" / name)
        have, missing = bench.available_methods(suite)
        runs = suite.runs(methods=have)
        assert runs and not missing, f"{name}: methods without a registered strategy: {missing}"
        bench.resolve_runs(runs)


def test_pareto_front() -> None:
    pts = [(1.0, 0.80), (2.0, 0.85), (3.0, 0.84), (0.5, 0.70), (2.0, 0.85), (4.0, 0.90), (5.0, math.nan)]
    assert bench.pareto_front(pts) == [True, True, False, True, True, True, False]


def test_slots_split_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    one = bench.make_slots(1)
    assert one == [bench.Slot(0, None)] and "RAY_OVERRIDE_RESOURCES" not in bench.slot_env(one[0], {})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    slots = bench.make_slots(2)
    assert [s.cores for s in slots] == [(0, 1), (2, 3)]
    env = bench.slot_env(slots[1], {})
    assert json.loads(env["RAY_OVERRIDE_RESOURCES"]) == {"CPU": 2} and env["OMP_NUM_THREADS"] == "2"
    assert bench.slot_config({"client-cpus": 2.0, "lr": 0.1}, slots[0]) == {"client-cpus": 1.0, "lr": 0.1}
    with pytest.raises(ConfigError, match="--jobs 6 exceeds the 5 cores"):
        bench.make_slots(6)


# ----------------------------------------------------------------------------- resume + summary


def test_resume_skips_finished_runs_and_summary_is_computed_from_the_runs(tmp_path: Path) -> None:
    suite = _suite()
    out = tmp_path / "bench"
    runner = LoopbackRunner()
    lines: list[str] = []
    first = bench.run_suite(suite, out, runner=runner, report=lines.append)
    names = ["fedavg--iid--s0", "fedavg--iid--s1", "topk--iid--s0", "topk--iid--s1"]
    assert runner.calls == names and first.ran == names and first.failed == []
    assert any("done  topk / iid / seed 1" in ln for ln in lines)

    # everything finished: a second call runs nothing and rebuilds the same tables
    again = bench.run_suite(suite, out, runner=_never, report=lines.append)
    assert again.skipped == names and again.ran == []
    pd.testing.assert_frame_equal(again.summary, first.summary)

    # the summary's figures are the per-run figures aggregated over seeds
    runs = {n: json.loads((out / n / "summary.json").read_text()) for n in names}
    reports = out / "tiny"  # the suite's reports: DIR/<suite name>/
    summary = pd.read_csv(reports / "summary.csv")
    for method in ("fedavg", "topk"):
        row = summary[summary["method"] == method].iloc[0]
        finals = [runs[f"{method}--iid--s{s}"]["final_accuracy"] for s in (0, 1)]
        bests = [runs[f"{method}--iid--s{s}"]["best_accuracy"] for s in (0, 1)]
        totals = [runs[f"{method}--iid--s{s}"]["mb_total"] for s in (0, 1)]
        assert row["seeds"] == 2
        assert row["final_acc_mean"] == pytest.approx(statistics.mean(finals))
        assert row["final_acc_std"] == pytest.approx(statistics.stdev(finals))
        assert row["best_acc_std"] == pytest.approx(statistics.stdev(bests))
        assert row["mb_total"] == pytest.approx(statistics.mean(totals))
        assert row["mb_up"] == pytest.approx(statistics.mean(runs[f"{method}--iid--s{s}"]["mb_up"] for s in (0, 1)))
    fedavg, topk = (summary[summary["method"] == m].iloc[0] for m in ("fedavg", "topk"))
    assert fedavg["ratio_total"] == pytest.approx(1.0)
    assert topk["ratio_up"] == pytest.approx(topk["mb_up"] / fedavg["mb_up"]) and topk["ratio_up"] < 0.2
    assert topk["ratio_down"] == pytest.approx(1.0, abs=0.01)  # Top-k compresses the uplink only
    assert list(summary["pareto"]) == bench.pareto_front(list(zip(summary["mb_total"], summary["final_acc_mean"])))

    # the tidy table is every run's rounds.csv with method / split / seed columns
    all_rounds = pd.read_csv(reports / "all_rounds.csv")
    assert len(all_rounds) == 4 * 2 and {"run", "method", "split", "seed", "cum_mb_total"} <= set(all_rounds.columns)
    for n in names:
        own = pd.read_csv(out / n / "rounds.csv")
        mine = all_rounds[all_rounds["run"] == n]
        assert mine["cum_bytes_up"].tolist() == own["cum_bytes_up"].tolist()
        assert (mine["seed"] == int(n[-1])).all() and (mine["method"] == n.split("--")[0]).all()
    md = (reports / "summary.md").read_text()
    assert "| topk | topk | 2 |" in md and "Pareto front" in md
    assert (reports / "pareto.png").stat().st_size > 0 and (reports / "accuracy_vs_mb.png").stat().st_size > 0
    assert not (out / "summary.csv").exists()  # nothing of the suite's own at the top of DIR
    marker = json.loads((out / "fedavg--iid--s0" / "bench.json").read_text())
    assert marker["exit_code"] == 0 and marker["wall_seconds"] > 0

    # what each run ran on (fedsparse.environment): in its summary.json and in the suite's runs.csv
    from fedsparse.environment import describe

    expected = describe({})
    per_run = pd.read_csv(reports / "runs.csv")
    for n in names:
        env = runs[n]["environment"]
        for key in ("flwr", "torch", "numpy", "ray", "python", "torch_threads", "device", "index_kinds"):
            assert env[key] == expected[key], (n, key)
        row = per_run[per_run["run"] == n].iloc[0]
        assert str(row["env_flwr"]) == expected["flwr"] and str(row["env_torch"]) == expected["torch"]

    # an interrupted run (no summary.json) is run again — and only that one
    (out / "topk--iid--s1" / "summary.json").unlink()
    runner.calls.clear()
    third = bench.run_suite(suite, out, runner=runner, report=lines.append)
    assert runner.calls == ["topk--iid--s1"] and len(third.skipped) == 3
    # a run whose configuration changed is run again, saying why
    changed = _suite()
    changed.extra = {"lr": 0.04}
    runner.calls.clear()
    lines.clear()
    bench.run_suite(changed, out, runner=runner, methods=["fedavg"], seeds=[0], report=lines.append)
    assert runner.calls == ["fedavg--iid--s0"]
    assert any("configuration changed (lr: 0.05 -> 0.04)" in ln for ln in lines)


def test_failed_run_is_reported_and_the_suite_goes_on(tmp_path: Path) -> None:
    suite = _suite(seeds=[0])

    def flaky(spec, cfg, run_dir, slot):
        if spec.method == "topk":
            raise RuntimeError("boom")
        return LoopbackRunner()(spec, cfg, run_dir, slot)

    lines: list[str] = []
    result = bench.run_suite(suite, tmp_path, runner=flaky, report=lines.append)
    assert result.failed == ["topk--iid--s0"] and result.ran == ["fedavg--iid--s0"]
    assert "runner raised: RuntimeError('boom')" in (tmp_path / "topk--iid--s0" / "bench.log").read_text()
    assert any("FAILED topk--iid--s0" in ln for ln in lines)
    assert list(pd.read_csv(tmp_path / "tiny" / "summary.csv")["method"]) == ["fedavg"]
    assert "Failed runs" in (tmp_path / "tiny" / "summary.md").read_text()
    assert not (tmp_path / "topk--iid--s0" / "bench.json").exists()


def test_a_run_is_finished_only_with_the_bench_marker_and_a_readable_summary(tmp_path: Path) -> None:
    """A run that wrote summary.json but then failed (non-zero exit), a run whose completion marker is
    missing, and one whose summary.json is truncated are all run again — never skipped, never read."""
    suite = _suite(seeds=[0])
    names = ["fedavg--iid--s0", "topk--iid--s0"]
    calls: list[str] = []

    def fails_after_summary(spec, cfg, run_dir, slot):
        calls.append(spec.name)
        LoopbackRunner()(spec, cfg, run_dir, slot)  # summary.json, rounds.csv, config.toml all written
        return 1 if spec.method == "topk" else 0  # ... and then the process failed (plots, exit)

    lines: list[str] = []
    first = bench.run_suite(suite, tmp_path, runner=fails_after_summary, report=lines.append)
    assert first.failed == ["topk--iid--s0"] and first.ran == ["fedavg--iid--s0"]
    assert (tmp_path / "topk--iid--s0" / "summary.json").is_file()
    assert not (tmp_path / "topk--iid--s0" / "bench.json").exists()
    assert any("FAILED topk--iid--s0 (exit 1)" in ln for ln in lines)
    cfgs = bench.resolve_runs(suite.runs())
    assert bench.run_status(tmp_path / "topk--iid--s0", cfgs["topk--iid--s0"]) == (False, "incomplete")
    assert list(pd.read_csv(tmp_path / "tiny" / "summary.csv")["method"]) == ["fedavg"]  # not reported

    # the next invocation reruns the failed run (its directory cleared), and only that one
    runner = LoopbackRunner()
    (tmp_path / "topk--iid--s0" / "stale.txt").write_text("from the failed attempt")
    second = bench.run_suite(suite, tmp_path, runner=runner, report=lines.append)
    assert runner.calls == ["topk--iid--s0"] and second.skipped == ["fedavg--iid--s0"]
    assert not (tmp_path / "topk--iid--s0" / "stale.txt").exists()
    assert list(pd.read_csv(tmp_path / "tiny" / "summary.csv")["method"]) == ["fedavg", "topk"]

    # a truncated summary.json (marker present) is not finished either: rerun, and the report does not crash
    summary = tmp_path / "fedavg--iid--s0" / "summary.json"
    summary.write_text(summary.read_text()[:40])
    done, why = bench.run_status(tmp_path / "fedavg--iid--s0", cfgs["fedavg--iid--s0"])
    assert not done and "summary.json does not parse" in why
    all_rounds, runs = bench.collect(tmp_path, suite.runs())  # the unreadable run is left out
    assert list(runs["run"]) == ["topk--iid--s0"]
    # a missing marker (summary.json intact) means the run was not seen to finish
    (tmp_path / "topk--iid--s0" / "bench.json").unlink()
    assert bench.run_status(tmp_path / "topk--iid--s0", cfgs["topk--iid--s0"]) == (False, "incomplete")
    runner.calls.clear()
    third = bench.run_suite(suite, tmp_path, runner=runner, report=lines.append)
    assert runner.calls == names and third.skipped == [] and third.failed == []
    assert all(bench.run_status(tmp_path / n, cfgs[n])[0] for n in names)


def test_a_run_cut_short_after_a_checkpoint_is_resumed_not_restarted(tmp_path: Path) -> None:
    """A run directory with checkpoint.npz and no completion marker continues from the checkpoint
    (``fedsparse run --resume``); one whose checkpoint belongs to another configuration starts over."""
    suite = _suite(methods=[{"name": "fedavg", "strategy": "fedavg"}])
    suite.extra = {"checkpoint-every": 1}
    names = ["fedavg--iid--s0", "fedavg--iid--s1"]

    def crashing(spec, cfg, run_dir, slot):  # the process dies in round 2, after the round-1 checkpoint
        grid = LoopbackGrid.for_config(cfg, first_node_id=2000, node_id_step=11, crash_in_round=2, crash_after=1)
        run_server(grid, cfg, run_dir, show_progress=False)
        return 0

    first = bench.run_suite(suite, tmp_path, runner=crashing, report=lambda line: None)
    assert first.failed == names
    before = pd.read_csv(tmp_path / names[0] / "rounds.csv")
    assert before["round"].tolist() == [1]

    seen: list[tuple[str, bool]] = []

    def resuming(spec, cfg, run_dir, slot):  # what the default runner does: --resume when a checkpoint is there
        resume = (run_dir / "checkpoint.npz").is_file()
        seen.append((spec.name, resume))
        run_server(loopback_grid(cfg, int(cfg["num-clients"])), cfg, run_dir, show_progress=False, resume=resume)
        return 0

    # seed 1 under another configuration: its checkpoint is not this run's, so it starts over
    changed = _suite(methods=[{"name": "fedavg", "strategy": "fedavg"}])
    changed.extra = {"checkpoint-every": 1, "lr": 0.04}
    lines: list[str] = []
    bench.run_suite(changed, tmp_path, runner=resuming, seeds=[1], report=lines.append)
    assert seen == [(names[1], False)]
    assert any(
        "seed 1 (incomplete; its checkpoint is of another configuration (lr: 0.05 -> 0.04), starting over)" in ln
        for ln in lines
    )
    # seed 0 as it was: continued from round 1, the round before the crash kept as written
    seen.clear()
    lines.clear()
    second = bench.run_suite(suite, tmp_path, runner=resuming, seeds=[0], report=lines.append)
    assert seen == [(names[0], True)] and second.ran == [names[0]]
    assert any("(incomplete; resuming from its round-1 checkpoint)" in ln for ln in lines)
    after = pd.read_csv(tmp_path / names[0] / "rounds.csv")
    assert after["round"].tolist() == [1, 2]
    pd.testing.assert_frame_equal(after.iloc[:1], before)
    marker = json.loads((tmp_path / names[0] / "bench.json").read_text())
    assert marker["resumed_from_round"] == 1
    assert "runner raised: SimulatedCrash" in (tmp_path / names[0] / "bench.log").read_text()  # the log is kept


def test_the_default_runner_resumes_with_fedsparse_run(tmp_path: Path) -> None:
    cfg_path = tmp_path / "bench-config.toml"
    fresh = bench.run_command(cfg_path, tmp_path)
    assert fresh[-5:] == ["run", str(cfg_path), "--out", str(tmp_path), "--quiet"]
    (tmp_path / "checkpoint.npz").write_bytes(b"")  # run_suite leaves one only if it is this run's
    # the configuration goes along, so `fedsparse run` itself refuses a checkpoint of another one
    assert bench.run_command(cfg_path, tmp_path)[-5:] == ["run", str(cfg_path), "--resume", str(tmp_path), "--quiet"]


def test_suites_sharing_an_out_dir_share_runs_but_not_reports(tmp_path: Path) -> None:
    """Two suites run into one DIR: identical runs are reused, each suite's reports are its own."""
    main = _suite(seeds=[0])
    other = _suite(
        name="tiny-extra",
        seeds=[0],
        methods=[
            {"name": "fedavg", "strategy": "fedavg"},  # identical to the main suite's: shared
            {"name": "fedprox", "strategy": "fedprox", "proximal-mu": 0.01},
        ],
    )
    runner = LoopbackRunner()
    bench.run_suite(main, tmp_path, runner=runner, report=lambda line: None)
    runner.calls.clear()
    result = bench.run_suite(other, tmp_path, runner=runner, report=lambda line: None)
    assert runner.calls == ["fedprox--iid--s0"] and result.skipped == ["fedavg--iid--s0"]
    assert {p.parent for p in result.files} == {tmp_path / "tiny-extra"}
    assert list(pd.read_csv(tmp_path / "tiny" / "summary.csv")["method"]) == ["fedavg", "topk"]
    assert list(pd.read_csv(tmp_path / "tiny-extra" / "summary.csv")["method"]) == ["fedavg", "fedprox"]
    assert "Benchmark suite `tiny`" in (tmp_path / "tiny" / "summary.md").read_text()
    assert "Benchmark suite `tiny-extra`" in (tmp_path / "tiny-extra" / "summary.md").read_text()
    # the suite name is a directory next to the runs: it must be a plain name without "--"
    for bad in ("a/b", "x--iid--s0", ".."):
        with pytest.raises(ConfigError, match=f"suite name {bad!r} is not allowed"):
            bench.parse_suite({"name": bad, "methods": [{"name": "a", "strategy": "fedavg"}]})


def test_cli_dry_run_lists_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsparse.cli import main

    suite = ROOT / "experiments" / "suites" / "smoke.toml"
    assert main(["bench", str(suite), "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "fedavg--iid--s0" in out and "3 runs, 3 to run" in out
    assert main(["bench", str(suite), "--out", str(tmp_path), "--dry-run", "--only", "nope"]) == 2


# ----------------------------------------------------------------------------- end to end (Ray)


@pytest.mark.ray
def test_smoke_suite_end_to_end(smoke_suite_runs: Path, tmp_path: Path) -> None:
    """``fedsparse bench`` on the smoke suite: subprocess per run on Ray, two at once; then resume:
    finished runs are skipped, and a run the bench did not see finish is continued from its
    checkpoint by ``fedsparse run CONFIG --resume DIR``. The first run is the session's
    ``smoke_suite_runs``; this test works on a copy of it."""
    shutil.copytree(smoke_suite_runs, tmp_path, dirs_exist_ok=True)
    cmd = smoke_bench_command(tmp_path, *SMOKE_BENCH_EXTRA)
    summary = pd.read_csv(tmp_path / "smoke" / "summary.csv")
    assert list(summary["method"]) == ["fedavg", "topk", "fedpaq"]
    assert (summary["final_acc_mean"] > 0.1).all()
    assert summary.set_index("method").loc["topk", "ratio_up"] < 0.1
    assert summary.set_index("method").loc["fedpaq", "ratio_up"] < 0.2
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert again.returncode == 0 and "3 already done, 0 to run" in again.stdout
    # as if the bench had been killed between the run's exit and its marker: the round-2 checkpoint
    # is there, so the run is resumed (the last round's checkpoint: nothing left to train), not rerun
    run_dir = tmp_path / "topk--iid--s0"
    (run_dir / "bench.json").unlink()
    before = pd.read_csv(run_dir / "rounds.csv")
    resumed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "2 already done, 1 to run" in resumed.stdout and "resuming from its round-2 checkpoint" in resumed.stdout
    assert json.loads((run_dir / "bench.json").read_text())["resumed_from_round"] == 2
    after = pd.read_csv(run_dir / "rounds.csv")
    pd.testing.assert_frame_equal(
        after[["round", "test_accuracy", "cum_bytes_up"]], before[["round", "test_accuracy", "cum_bytes_up"]]
    )
