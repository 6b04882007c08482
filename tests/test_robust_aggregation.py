"""Robust aggregation (``aggregation``, ``clip-norm``: fedsparse/robust.py): each rule is Flower's own
function applied to the decoded dense updates, under plain-model and compressed methods; a scale
attack by 2 of 10 clients moves the mean far and the robust rules little; configurations that
cannot work are refused at configuration time. Real clients on the in-process loopback grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg
from flwr.supercore.differential_privacy import get_norm
from loopback import EngineLikeGrid, set_task_identity

from clients.app import make_client_app
from fedsparse import codec
from fedsparse.compressors import decode_update
from fedsparse.config import ConfigError, resolve_config
from fedsparse.robust import AggregationRule
from fedsparse.server import RunResult, initial_model, run_server

BASE = {
    "num-clients": 5,
    "clients-per-round": 5,
    "rounds": 1,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.05,
    "wire-bytes": False,
    "seed": 5,
    "eval-batch-size": 2000,
}


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


def _run(tmp: Path, **over: Any) -> tuple[RunResult, EngineLikeGrid, dict[str, Any]]:
    cfg = resolve_config({**BASE, "out-dir": str(tmp), **over})
    grid = EngineLikeGrid(make_client_app(cfg), int(cfg["num-clients"]))
    return run_server(grid, cfg, tmp, show_progress=False), grid, cfg


def _start(cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in initial_model(cfg).state_dict().items()}


def _updates(grid: EngineLikeGrid, start: dict[str, np.ndarray], compressed: bool) -> tuple[list[str], list[list]]:
    """The round-1 replies decoded to dense updates, in model order."""
    names = list(start)
    out = []
    for msg in sorted(grid.replies_of_round[1], key=lambda m: m.metadata.src_node_id):
        arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        if compressed:
            deltas, raws = decode_update(codec.from_array_record(msg.content["arrays"]))
            dense = {**{k: d.astype(np.float64) for k, d in deltas.items()}, **raws}
        else:
            dense = {k: arrays[k].astype(np.float64) - start[k].astype(np.float64) for k in names}
        out.append([dense[k] for k in names])
    return names, out


@pytest.mark.parametrize("strategy", ["fedavg", "topk"])
@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum"])
def test_the_rule_is_flowers_function_of_the_decoded_updates(strategy: str, rule: str, tmp_path: Path) -> None:
    res, grid, cfg = _run(tmp_path, strategy=strategy, aggregation=rule, **{"num-malicious": 1, "trim-beta": 0.2})
    start = _start(cfg)
    names, updates = _updates(grid, start, compressed=strategy == "topk")
    results = [(u, 1) for u in updates]
    expected = {
        "median": lambda: aggregate_median(results),
        "trimmed-mean": lambda: aggregate_trimmed_avg(results, 0.2),
        "krum": lambda: aggregate_krum(results, 1, 0),
    }[rule]()
    for name, e in zip(names, expected):
        want = (start[name].astype(np.float64) + e).astype(start[name].dtype)
        np.testing.assert_allclose(res.arrays[name].numpy(), want, rtol=1e-6, atol=1e-7, err_msg=name)
    # and it is not the mean: the rule changed the result
    mean = {n: start[n] + np.mean([u[i] for u in updates], axis=0) for i, n in enumerate(names)}
    assert any(not np.allclose(res.arrays[n].numpy(), mean[n], atol=1e-7) for n in names)


def test_mean_without_clipping_wraps_nothing(tmp_path: Path) -> None:
    """aggregation = mean is every method's own weighted mean, bit for bit."""
    plain, _, _ = _run(tmp_path / "a", strategy="fedavg")
    explicit, _, _ = _run(tmp_path / "b", strategy="fedavg", aggregation="mean", **{"clip-norm": ""})
    for k in plain.arrays.keys():
        assert plain.arrays[k].numpy().tobytes() == explicit.arrays[k].numpy().tobytes()


def test_clip_auto_bounds_every_update_by_the_median_norm() -> None:
    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(size=(4, 3)) * s, "b": rng.normal(size=3) * s} for s in (1, 2, 3, 50, 400)]
    norms = [get_norm(list(u.values())) for u in updates]
    rule = AggregationRule("mean", clip_norm="auto")
    out = rule.combine_updates(updates, [1.0] * 5)
    bound = float(np.median(norms))
    assert rule.last["clip_bound"] == pytest.approx(bound) and rule.last["clipped"] == 2
    # the mean of clipped updates: each clipped one contributes exactly the bound
    clipped = [{k: v * min(1.0, bound / n) for k, v in u.items()} for u, n in zip(updates, norms)]
    for k in out:
        np.testing.assert_allclose(out[k], np.mean([c[k] for c in clipped], axis=0))
    assert get_norm(list(out.values())) <= bound + 1e-9
    fixed = AggregationRule("median", clip_norm=0.5)
    fixed.combine_updates(updates, [1.0] * 5)
    assert fixed.last["clipped"] == 5


def test_too_few_replies_at_round_time_fall_back_to_the_median() -> None:
    rng = np.random.default_rng(1)
    updates = [{"w": rng.normal(size=6)} for _ in range(4)]
    rule = AggregationRule("bulyan", num_malicious=1)  # needs 7
    out = rule.combine_updates(updates, [1.0] * 4)
    assert rule.last["fallback"] == "median"
    np.testing.assert_allclose(out["w"], np.median([u["w"] for u in updates], axis=0))


@pytest.mark.slow
def test_scale_attack_moves_the_mean_not_the_robust_rules(tmp_path: Path) -> None:
    """2 of 10 clients reply global − 10·Δ: the mean lands far from the clean run's model, the
    median, trimmed mean, Krum and clip-norm = auto stay close to it."""
    setting = {"num-clients": 10, "clients-per-round": 10, "rounds": 2, "strategy": "fedavg"}
    attack = {"fail-clients": "*:0:scale, *:1:scale", "attack-scale": -10.0}
    clean, _, _ = _run(tmp_path / "clean", **setting)
    ref = np.concatenate([clean.arrays[k].numpy().ravel() for k in clean.arrays.keys()])

    def distance(**over: Any) -> float:
        res, _, _ = _run(tmp_path / str(len(list(tmp_path.iterdir()))), **setting, **attack, **over)
        x = np.concatenate([res.arrays[k].numpy().ravel() for k in res.arrays.keys()])
        return float(np.linalg.norm(x - ref))

    mean = distance()
    robust = {
        "median": distance(aggregation="median"),
        "trimmed-mean": distance(aggregation="trimmed-mean", **{"trim-beta": 0.2}),
        "krum": distance(aggregation="krum", **{"num-malicious": 2}),
        "clip-auto": distance(**{"clip-norm": "auto"}),
    }
    for name, d in robust.items():
        assert d < 0.35 * mean, (name, d, mean)


def test_config_refuses_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match=r"aggregation = 'krum' with num-malicious = 2 needs at least 2f \+ 3 = 7"):
        resolve_config({**BASE, "aggregation": "krum", "num-malicious": 2})
    with pytest.raises(ConfigError, match=r"'bulyan' with num-malicious = 1 needs at least 4f \+ 3 = 7"):
        resolve_config({**BASE, "num-clients": 6, "clients-per-round": 6, "aggregation": "bulyan", "num-malicious": 1})
    with pytest.raises(ConfigError, match=r"clip-norm = '-1' is not valid; allowed: a finite number > 0, 'auto'"):
        resolve_config({**BASE, "clip-norm": "-1"})
    with pytest.raises(ConfigError, match=r"trim-beta = 0.5 is out of range"):
        resolve_config({**BASE, "aggregation": "trimmed-mean", "trim-beta": 0.5})
    with pytest.raises(ConfigError, match=r"krum-keep = 9 exceeds clients-per-round = 5"):
        resolve_config({**BASE, "aggregation": "multikrum", "krum-keep": 9})
    assert resolve_config({**BASE, "clip-norm": 2})["clip-norm"] == "2.0"


ALL_METHODS = [
    "fedavg",
    "fedprox",
    "feddip",
    "snip",
    "topk",
    "randk",
    "fedpaq",
    "dgc",
    "sbc",
    "fedluar",
    "fedluar-paq",
    "feddip-luar",
    "partial-update",
]


@pytest.mark.parametrize("strategy", ALL_METHODS)
def test_every_builtin_method_runs_with_a_rule(strategy: str, tmp_path: Path) -> None:
    """Each method's honest replies pass the reply screen (its declared metric keys included) and
    are combined by the median after clipping; the model moves and stays finite."""
    over = {"num-clients": 3, "clients-per-round": 3, "rounds": 2, "local-steps": 1, "recycled-layers": 1}
    res, _, cfg = _run(tmp_path, strategy=strategy, aggregation="median", **{"clip-norm": "auto"}, **over)
    rows = res.rounds.set_index("round")
    assert rows["rejected"].tolist() == [0, 0] and rows["aggregated"].all(), rows
    start = _start(cfg)
    assert all(np.isfinite(res.arrays[k].numpy()).all() for k in res.arrays.keys())
    assert any(not np.array_equal(res.arrays[k].numpy(), start[k]) for k in start)


def test_a_strategy_that_cannot_decode_refuses_a_rule() -> None:
    """A strategy with fedsparse's hooks that does not say how to decode its replies (the hooks'
    default) refuses a rule; so does a Flower strategy outside the FedAvg family."""
    from flwr.serverapp.strategy import Strategy

    from fedsparse.hooks import MethodHooks
    from fedsparse.robust import apply_rule

    class Opaque(MethodHooks):
        pass

    class Foreign(Strategy):  # abstract methods are never called here
        pass

    rule = AggregationRule("median")
    with pytest.raises(ConfigError, match=r"aggregation = 'median' is not supported by Opaque"):
        apply_rule(Opaque(), rule)  # type: ignore[arg-type]
    Foreign.__abstractmethods__ = frozenset()
    with pytest.raises(ConfigError, match=r"Foreign is not in Flower's FedAvg family"):
        apply_rule(Foreign(), rule)


def test_the_robustness_suite_resolves_every_run() -> None:
    """experiments/suites/robustness.toml: 28 runs that pass the configuration checks (Krum's and
    Bulyan's bounds with 10 clients a round, scale on FedDIP); in each attacked run exactly 2
    partitions attack in every one of the 50 rounds (the same schedule for every run)."""
    from fedsparse import bench
    from fedsparse.failures import parse_fail_clients

    root = Path(__file__).resolve().parents[1]
    suite = bench.load_suite(root / "experiments" / "suites" / "robustness.toml")
    cfgs = bench.resolve_runs(suite.runs())
    assert len(cfgs) == 28
    attacked = {name: c for name, c in cfgs.items() if "attacked" in name}
    assert len(attacked) == 14 and len({c["fail-clients"] for c in attacked.values()}) == 1
    rules = parse_fail_clients(next(iter(attacked.values()))["fail-clients"])
    assert all(r.mode == "scale" for r in rules)
    per_round = [sorted(r.partition for r in rules if r.server_round == n) for n in range(1, 51)]
    assert all(len(parts) == 2 and 0 <= parts[0] < parts[1] < 20 for parts in per_round), per_round
    assert {c["aggregation"] for c in cfgs.values()} == {
        "mean",
        "median",
        "trimmed-mean",
        "krum",
        "multikrum",
        "bulyan",
    }
    assert all((c["num-clients"], c["clients-per-round"], c["rounds"]) == (20, 10, 50) for c in cfgs.values())
