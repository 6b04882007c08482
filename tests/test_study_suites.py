"""The study suites (experiments/suites/{feddip,fedluar,partial-update}.toml) run exactly the grids
of the runner scripts they replaced, and the study reports read what the bench leaves.

Each study used to have its own runner script (experiments/run_feddip.py, run_fedluar.py,
run_partial_update.py; e.g. ``git show 8a709c9:experiments/run_fedluar.py``) with its own notion of
a finished run. Their grids are written out below as they were — config file and overrides per
run — and every run of the suite must resolve to the same configuration as the corresponding
runner's run, key for key (parsing only: nothing runs).
The report scripts are then run on tiny in-process runs of each suite (a few rounds, the loopback
grid of test_bench.py), so a change in the runs' files that breaks them shows up here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pytest
from loopback import set_task_identity  # tests/ is on sys.path under pytest
from test_bench import TINY_BASE, LoopbackRunner

from fedsparse import bench
from fedsparse.config import ConfigError, resolve_config

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "experiments" / "suites"
CONFIGS = ROOT / "experiments" / "configs"
Grid = dict[str, tuple[str, dict[str, Any]]]  # bench run name -> (config file, overrides)


# ------------------------------------------------------------------ the runners' grids, as they were


def feddip_runner_grid() -> Grid:
    """run_feddip.py's GRID with its defaults (--rounds 200 --eval-every 5 --client-cpus 1 --seed 0
    --checkpoint-every 10); old run OUT/<setting>-<method>, now <method>--<setting>--s0."""
    common = {"rounds": 200, "eval-every": 5, "client-cpus": 1.0, "seed": 0, "checkpoint-every": 10}
    pathological = {"partition": "pathological", "classes-per-client": 2}
    grid = [
        ("iid", "fedavg", "fedavg-fmnist-lenet5.toml", {}),
        ("iid", "feddp", "feddp-fmnist-lenet5.toml", {}),
        ("iid", "feddip", "feddip-fmnist-lenet5.toml", {}),
        ("noniid", "fedavg", "fedavg-fmnist-lenet5.toml", pathological),
        ("noniid", "fedprox", "fedprox-fmnist-lenet5-noniid.toml", {}),
        ("noniid", "feddp", "feddp-fmnist-lenet5.toml", pathological),  # added for Table V (issue 15)
        ("noniid", "feddip-prox", "feddip-prox-fmnist-lenet5-noniid.toml", {}),
    ]
    return {f"{method}--{setting}--s0": (config, {**common, **extra}) for setting, method, config, extra in grid}


def fedluar_runner_grid(config: str, common: dict[str, Any]) -> Grid:
    """run_fedluar.py's grid: δ ∈ {0..3} over FedAvg, then FedAdam and FedProx at δ = 0 and δ = 1
    (``--best-delta 1``, the sweep's pick); old run OUT/<base>-d<δ>, now <base>-d<δ>--dir0.1--s0."""
    base_settings = {"fedadam": {"luar-server-lr": 0.01}, "fedprox": {"proximal-mu": 0.001}}
    runs = {f"fedavg-d{d}": {"luar-base": "fedavg", "recycled-layers": d} for d in (0, 1, 2, 3)}
    for base in ("fedadam", "fedprox"):
        for d in (0, 1):
            runs[f"{base}-d{d}"] = {**base_settings[base], "luar-base": base, "recycled-layers": d}
    return {
        f"{label}--dir0.1--s0": (config, {"checkpoint-every": 10, **common, **over}) for label, over in runs.items()
    }


def partial_update_runner_grid() -> Grid:
    """run_partial_update.py's ``--grid main`` and ``--grid adam`` (lr 1e-3); old run
    OUT/<data>-<method> (adam: OUT/adam/mnist-adam-<method>), now <method>--<split>--s0."""
    mnist, fmnist, adam = "partial-mnist-mlp.toml", "partial-fmnist-lenet5.toml", {"optimizer": "adam", "lr": 1e-3}
    runs: Grid = {"fedavg--mnist-mlp--s0": (mnist, {"strategy": "fedavg"})}
    for k in (0.005, 0.01, 0.05, 0.1):
        for c in ("combined", "global", "random"):
            runs[f"{c}-k{k}--mnist-mlp--s0"] = (mnist, {"update-ratio": k, "contribution": c})
    runs["combined-k0.05-8bit--mnist-mlp--s0"] = (mnist, {"update-ratio": 0.05, "value-bits": 8})
    runs["fedavg--fmnist-lenet5--s0"] = (fmnist, {"strategy": "fedavg"})
    for c in ("combined", "global", "random"):
        runs[f"{c}-k0.05--fmnist-lenet5--s0"] = (fmnist, {"update-ratio": 0.05, "contribution": c})
    runs["combined-k0.05-8bit--fmnist-lenet5--s0"] = (fmnist, {"update-ratio": 0.05, "value-bits": 8})
    runs["combined-k0.05-denseinit--mnist-mlp--s0"] = (mnist, {"update-ratio": 0.05, "initial-sync": "dense"})
    runs["combined-k0.05-residual--mnist-mlp--s0"] = (mnist, {"update-ratio": 0.05, "after-broadcast": "residual"})
    runs["fedavg--mnist-mlp-adam--s0"] = (mnist, {"strategy": "fedavg", **adam})
    for k in (0.01, 0.05):
        for c in ("combined", "global"):
            runs[f"{c}-k{k}--mnist-mlp-adam--s0"] = (mnist, {"update-ratio": k, "contribution": c, **adam})
    return runs


def partial_update_issue15_runs() -> Grid:
    """Added for issue 15: the former RPU and exact local metric beside the new defaults, and DPU's
    fine-tuning step."""
    mnist, fmnist = "partial-mnist-mlp.toml", "partial-fmnist-lenet5.toml"
    k05 = {"update-ratio": 0.05}
    return {
        "random-k0.005-after--mnist-mlp--s0": (
            mnist,
            {"update-ratio": 0.005, "contribution": "random", "random-mask": "after-training"},
        ),
        "combined-k0.05-client--mnist-mlp--s0": (mnist, {**k05, "local-metric": "client"}),
        "combined-k0.05-client8bit--mnist-mlp--s0": (mnist, {**k05, "local-metric": "client-8bit"}),
        "combined-k0.05-top2k--mnist-mlp--s0": (mnist, {**k05, "local-metric": "client-top2k"}),
        "combined-k0.05-finetune--mnist-mlp--s0": (mnist, {**k05, "after-broadcast": "finetune"}),
        "combined-k0.05-finetune--fmnist-lenet5--s0": (fmnist, {**k05, "after-broadcast": "finetune"}),
        "combined-k0.005-finetune--mnist-mlp--s0": (mnist, {"update-ratio": 0.005, "after-broadcast": "finetune"}),
    }


def _assert_same_runs(suite: bench.Suite, grid: Grid) -> None:
    configs = bench.resolve_runs(suite.runs())
    assert sorted(configs) == sorted(grid)
    for name, (config, overrides) in grid.items():
        want = resolve_config(CONFIGS / config, overrides)
        have = configs[name]
        assert have == want, f"{name}: " + ", ".join(
            f"{k}: suite {have.get(k)!r}, runner {want.get(k)!r}"
            for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)
        )


# ------------------------------------------------------------------ the suites run the same grids


def test_feddip_suite_is_the_runners_grid() -> None:
    suite = bench.load_suite(SUITES / "feddip.toml")
    assert len(suite.runs()) == 7 and suite.baseline == "fedavg"
    assert [r.name for r in suite.runs(splits=["iid"])] == ["fedavg--iid--s0", "feddp--iid--s0", "feddip--iid--s0"]
    _assert_same_runs(suite, feddip_runner_grid())
    cfg = bench.resolve_runs(suite.runs(methods=["feddip-prox"]))["feddip-prox--noniid--s0"]
    assert (cfg["rounds"], cfg["partition"], cfg["feddip-prox"], cfg["lambda-max"]) == (200, "pathological", True, 1e-3)


def test_fedluar_suite_is_the_runners_grid() -> None:
    # as measured for experiments/results/fedluar.md: the CNN config with --set rounds=100 --set wire-bytes=false
    suite = bench.load_suite(SUITES / "fedluar.toml")
    assert len(suite.runs()) == 8 and suite.baseline == "fedavg-d0"
    _assert_same_runs(suite, fedluar_runner_grid("fedluar-fmnist-cnn.toml", {"rounds": 100, "wire-bytes": False}))
    # the runner's default (--config fedluar-fmnist-lenet5.toml), as the suite's comment says to run it
    lenet = bench.load_suite(SUITES / "fedluar.toml", {"model": "lenet5", "wire-bytes": True})
    _assert_same_runs(lenet, fedluar_runner_grid("fedluar-fmnist-lenet5.toml", {}))


def test_fedluar_authors_setting_suites_are_issue_15s_grid() -> None:
    """Item 10: the paper's regime — δ = 0 and 2 over three seeds, δ = 1 and 3 over one — and
    Dirichlet 0.1 — δ = 0 and 2, one seed — both in the authors' setting, 200 rounds, milestones."""
    paper = bench.resolve_runs(bench.load_suite(SUITES / "fedluar-paper-regime.toml").runs())
    assert sorted(paper) == sorted(
        [f"d{d}--iid--s{s}" for d in (0, 2) for s in (0, 1, 2)] + ["d1--iid--s0", "d3--iid--s0"]
    )
    dirichlet = bench.resolve_runs(bench.load_suite(SUITES / "fedluar-dirichlet.toml").runs())
    assert sorted(dirichlet) == ["d0--dir0.1--s0", "d2--dir0.1--s0"]
    setting = {
        "strategy": "fedluar",
        "luar-base": "fedavg",
        "model": "cnn",
        "dataset": "fashion-mnist",
        "num-clients": 128,
        "clients-per-round": 32,
        "local-steps": 20,
        "batch-size": 20,
        "lr": 0.01,
        "momentum": 0.9,
        "rounds": 200,
        "luar-lr-milestones": "100,150",
        "weighting": "uniform",
        "client-momentum": "slot",
        "init": "glorot",
        "weight-decay": 0.0,
        "weight-decay-rule": "fedluar-reference",
        "persist-momentum": False,
    }
    for name, cfg in {**paper, **dirichlet}.items():
        assert {k: cfg[k] for k in setting} == setting, name
        assert cfg["recycled-layers"] == int(name[1]) and cfg["seed"] == int(name[-1]), name
        assert cfg["checkpoint-every"] > 0, name  # long runs: resumable
        assert cfg["partition"] == ("iid" if name in paper else "dirichlet"), name
    assert {cfg["alpha"] for cfg in dirichlet.values()} == {0.1}


def test_partial_update_suite_is_the_runners_grids() -> None:
    suite = bench.load_suite(SUITES / "partial-update.toml")
    runs = suite.runs()
    assert len(runs) == 33 and {r.split: 0 for r in runs}.keys() == {"mnist-mlp", "fmnist-lenet5", "mnist-mlp-adam"}
    assert (
        len(suite.runs(splits=["mnist-mlp", "fmnist-lenet5"])) == 28 and len(suite.runs(splits=["mnist-mlp-adam"])) == 5
    )
    _assert_same_runs(suite, {**partial_update_runner_grid(), **partial_update_issue15_runs()})


def test_a_method_may_run_in_some_splits_only() -> None:
    suite = bench.parse_suite(
        {
            "splits": {"a": {}, "b": {}},
            "methods": [{"name": "m", "strategy": "fedavg"}, {"name": "n", "strategy": "fedprox", "splits": ["b"]}],
        }
    )
    assert [r.name for r in suite.runs()] == ["m--a--s0", "m--b--s0", "n--b--s0"]
    assert "splits" not in suite.methods["n"]  # not a configuration key
    assert suite.runs(splits=["a"], methods=["n"]) == []
    for bad in (["c"], [], "b", ["b", "b"], [1]):
        with pytest.raises(ConfigError, match="splits = "):
            bench.parse_suite(
                {"splits": {"a": {}, "b": {}}, "methods": [{"name": "n", "strategy": "fedavg", "splits": bad}]}
            )


# ------------------------------------------------------------------ the reports read the bench's runs


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "study, select, extra",
    [
        ("feddip", {"methods": ["fedavg", "feddip-prox"], "splits": ["noniid"]}, {}),
        ("fedluar", {"methods": ["fedavg-d0", "fedavg-d1"]}, {"model": "lenet5"}),
        ("partial-update", {"methods": ["fedavg", "global-k0.01"], "splits": ["mnist-mlp"]}, {}),
        ("smartidx", {"methods": ["smartidx-vgg11", "sbc-vgg11"], "splits": ["fmnist"]}, {"model": "lenet5"}),
    ],
)
def test_study_report_reads_tiny_runs(
    study: str, select: dict[str, Any], extra: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_task_identity(node_id=0)
    suite = bench.load_suite(SUITES / f"{study}.toml", {**TINY_BASE, **extra})
    result = bench.run_suite(suite, tmp_path, runner=LoopbackRunner(), report=lambda line: None, **select)
    assert result.failed == [] and len(result.ran) == len(suite.runs(**select))
    module = _script(f"report_{study.replace('-', '_')}")
    assert module.main([str(tmp_path), "--suite", str(SUITES / f"{study}.toml")]) == 0
    tables = sorted(p.name for p in (tmp_path / study).glob(f"{study}-table.*"))
    assert tables == [f"{study}-table.csv", f"{study}-table.md"]
    md = (tmp_path / study / f"{study}-table.md").read_text()
    assert md.count("\n") >= 2 + len(result.ran) and capsys.readouterr().out.strip()


def test_fedluar_report_reads_the_authors_setting_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The paper-regime suite's runs (slot momentum: their bytes counted) → the per-δ table and the
    model-only uplink ratio, which takes the slot-momentum records out again."""
    set_task_identity(node_id=0)
    path = SUITES / "fedluar-paper-regime.toml"
    suite = bench.load_suite(path, {**TINY_BASE, "model": "lenet5", "weight-decay-rule": "fixed"})
    select = {"methods": ["d0", "d1"], "seeds": [0]}
    result = bench.run_suite(suite, tmp_path, runner=LoopbackRunner(), report=lambda line: None, **select)
    assert result.failed == [] and len(result.ran) == 2
    module = _script("report_fedluar")
    assert module.main([str(tmp_path), "--suite", str(path)]) == 0
    table = pd.read_csv(tmp_path / "fedluar-paper-regime" / "fedluar-table.csv")
    d0 = table[table["delta"] == 0].iloc[0]
    assert d0["comm_ratio_up"] > 1.9  # the model and the momentum buffers, both counted
    assert d0["model_ratio_up"] == pytest.approx(1.0, abs=1e-3)  # the model alone: FedAvg's uplink
    d1 = table[table["delta"] == 1].iloc[0]
    assert d1["model_ratio_up"] < d0["model_ratio_up"]
    deltas = pd.read_csv(tmp_path / "fedluar-paper-regime" / "fedluar-deltas.csv")
    assert list(deltas["delta"]) == [0, 1] and deltas["final_vs_d0"].iloc[0] == 0.0
    assert capsys.readouterr().out.strip()
