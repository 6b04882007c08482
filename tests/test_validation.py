"""Reply validation: each kind of bad reply is rejected with its reason and never aggregated;
a fuzz test feeds random malformed replies to every registered strategy's validation + aggregation.

Everything runs in process (no Ray): the real ClientApp produces the well-formed replies that are
then corrupted (``EngineLikeGrid`` in tests/loopback.py), the real round-loop pieces screen and
aggregate them.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from loopback import EngineLikeGrid, set_task_identity

from clients.app import make_client_app
from fedsparse import checkpoint as ckpt
from fedsparse.accounting import Ledger
from fedsparse.config import resolve_config
from fedsparse.grid import MeteredGrid, seeded_sampling
from fedsparse.hooks import MethodHooks
from fedsparse.methods import build_strategy, strategy_names
from fedsparse.server import _aggregate, _screen_for, initial_model
from fedsparse.validation import (
    ReplyScreen,
    check_arrays,
    check_finite,
    check_magnitude,
    check_num_examples,
    spec_of,
    universal_check,
)

TINY = {
    "num-clients": 4,
    "clients-per-round": 3,
    "rounds": 10,
    "local-steps": 1,
    "batch-size": 8,
    "lr": 0.05,
    "wire-bytes": False,
    "seed": 5,
}


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


# ------------------------------------------------------------------------------------------------
# the check helpers
# ------------------------------------------------------------------------------------------------

SPEC = {"w": ((2, 3), "<f4"), "b": ((3,), "<f4"), "n": ((), "<i8")}


def _good() -> dict[str, np.ndarray]:
    return {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32), "n": np.array(4, np.int64)}


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.pop("b"), "missing arrays: b"),
        (lambda d: d.update(extra=np.zeros(1, np.float32)), "unexpected arrays: extra"),
        (lambda d: d.update(w=np.ones((3, 2), np.float32)), "'w' has shape (3, 2), expected (2, 3)"),
        (lambda d: d.update(w=np.ones((2, 3), np.float64)), "'w' has dtype float64, expected float32"),
        (lambda d: d["w"].__setitem__((0, 0), np.nan), "'w' contains NaN"),
        (lambda d: d["b"].__setitem__(1, -np.inf), "'b' contains inf"),
    ],
)
def test_check_arrays_names_the_problem(mutate: Callable, fragment: str) -> None:
    good = _good()
    assert check_arrays(good, SPEC) is None
    assert check_arrays(ArrayRecord({k: Array(v) for k, v in good.items()}), SPEC) is None
    bad = _good()
    mutate(bad)
    problem = check_arrays(bad, SPEC)
    assert problem is not None and fragment in problem
    problem = check_arrays(ArrayRecord({k: Array(v) for k, v in bad.items()}), SPEC)
    assert problem is not None and fragment in problem


def test_check_arrays_requires_the_model_order() -> None:
    """Flower's aggregation takes the first reply's key order and FedAvgM pairs arrays by position:
    an ArrayRecord with the right arrays in another order is rejected, naming the first misplaced one."""
    good = _good()
    shuffled = {k: good[k] for k in ("w", "n", "b")}
    problem = check_arrays(ArrayRecord({k: Array(v) for k, v in shuffled.items()}), SPEC)
    assert problem == "array 'n' is out of order: position 1 should hold 'b' (the model's order)"
    assert check_arrays(shuffled, SPEC) is None  # decoded tensors (aggregated by name): order is free
    assert "out of order" in str(check_arrays(shuffled, SPEC, ordered=True))
    # with omitted arrays, the order of the rest
    rest = ArrayRecord({k: Array(good[k]) for k in ("n", "b")})
    assert "array 'n' is out of order" in str(check_arrays(rest, SPEC, omit=["w"]))
    assert check_arrays(ArrayRecord({k: Array(good[k]) for k in ("b", "n")}), SPEC, omit=["w"]) is None


def test_check_arrays_omit_and_finite() -> None:
    partial = _good()
    del partial["w"]
    assert check_arrays(partial, SPEC, omit=["w"]) is None
    assert "unexpected" in str(check_arrays(_good(), SPEC, omit=["w"]))
    assert check_finite({"i": np.array([1, 2])}) is None  # integers cannot hold NaN


@pytest.mark.parametrize(
    ("value", "bound", "fragment"),
    [
        (0, 10, "not > 0"),
        (-3, 10, "not > 0"),
        (float("nan"), 10, "not > 0"),
        (float("inf"), None, "not > 0"),
        (11, 10, "exceeds this client's 10"),
        ([1, 2], 10, "not a number"),
        ("5", 10, "not a number"),
    ],
)
def test_num_examples_bounds(value: Any, bound: int | None, fragment: str) -> None:
    assert fragment in str(check_num_examples(value, bound))
    assert check_num_examples(10, 10) is None and check_num_examples(2.5, None) is None


def test_spec_of_reads_records_and_arrays() -> None:
    rec = ArrayRecord({k: Array(v) for k, v in _good().items()})
    assert spec_of(rec) == SPEC == spec_of(_good())


# ------------------------------------------------------------------------------------------------
# each kind of bad reply through the loop's screen (FedAvg: the generic model check)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_cfg() -> dict[str, Any]:
    return resolve_config(TINY)


@pytest.fixture(scope="module")
def model(model_cfg: dict[str, Any]) -> ArrayRecord:
    return ArrayRecord(initial_model(model_cfg).state_dict())


def _reply(content: RecordDict, node: int = 7) -> Message:
    out = Message(
        content=RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, reply_to=out)


def _content(arrays: dict[str, Any], metrics: dict[str, Any]) -> RecordDict:
    return RecordDict(
        {"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)}
    )


def _np(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy().copy() for k, a in rec.items()}


def _lying_array(x: np.ndarray) -> Array:
    real = Array(x)
    return Array(dtype=real.dtype, shape=tuple(d + 1 for d in x.shape), stype=real.stype, data=real.data)


def _garbage_array(x: np.ndarray) -> Array:
    real = Array(x)
    return Array(dtype=real.dtype, shape=tuple(x.shape), stype=real.stype, data=b"\x93NUMPY garbage")


def _with(content: RecordDict, **records: Any) -> RecordDict:
    out = RecordDict(dict(content.items()))
    for name, rec in records.items():
        if rec is None:
            del out[name]
        else:
            out[name] = rec
    return out


BAD_CASES: dict[str, tuple[Callable[[dict, RecordDict], RecordDict], str]] = {
    "nan": (
        lambda a, c: _content(
            {**a, "classifier.4.bias": np.full_like(a["classifier.4.bias"], np.nan)}, {"num-examples": 50}
        ),
        "contains NaN",
    ),
    "inf": (
        lambda a, c: _content(
            {**a, "features.0.weight": np.full_like(a["features.0.weight"], np.inf)}, {"num-examples": 50}
        ),
        "contains inf",
    ),
    "wrong shape": (
        lambda a, c: _content({**a, "classifier.4.bias": a["classifier.4.bias"][:-1]}, {"num-examples": 50}),
        "has shape",
    ),
    "wrong dtype": (
        lambda a, c: _content(
            {**a, "classifier.4.bias": a["classifier.4.bias"].astype(np.float64)}, {"num-examples": 50}
        ),
        "has dtype float64",
    ),
    "missing array": (
        lambda a, c: _content({k: v for k, v in a.items() if k != "classifier.4.bias"}, {"num-examples": 50}),
        "missing arrays: classifier.4.bias",
    ),
    "unexpected array": (
        lambda a, c: _content({**a, "backdoor": np.ones(3, np.float32)}, {"num-examples": 50}),
        "unexpected arrays: backdoor",
    ),
    "arrays out of order": (
        lambda a, c: _content(dict(reversed(list(a.items()))), {"num-examples": 50}),
        "is out of order",
    ),
    "second ArrayRecord": (
        lambda a, c: _with(c, extra=ArrayRecord({"x": Array(np.ones(2, np.float32))})),
        "exactly one ArrayRecord",
    ),
    "renamed ArrayRecord": (
        lambda a, c: _with(c, arrays=None, weights=c["arrays"]),
        "exactly one ArrayRecord named 'arrays'",
    ),
    "no arrays": (lambda a, c: _with(c, arrays=None), "exactly one ArrayRecord"),
    "undecodable array": (
        lambda a, c: _with(
            c,
            arrays=ArrayRecord(
                {**{k: Array(v) for k, v in a.items()}, "classifier.4.bias": _garbage_array(a["classifier.4.bias"])}
            ),
        ),
        "does not decode",
    ),
    "array lying about its shape": (
        lambda a, c: _with(
            c,
            arrays=ArrayRecord(
                {**{k: Array(v) for k, v in a.items()}, "classifier.4.bias": _lying_array(a["classifier.4.bias"])}
            ),
        ),
        "declares shape",
    ),
    "num-examples 0": (lambda a, c: _content(a, {"num-examples": 0}), "num-examples = 0 is not > 0"),
    "num-examples negative": (lambda a, c: _content(a, {"num-examples": -40}), "is not > 0"),
    "num-examples nan": (lambda a, c: _content(a, {"num-examples": float("nan")}), "is not > 0"),
    "num-examples absurd": (lambda a, c: _content(a, {"num-examples": 10**9}), "exceeds this client's"),
    "num-examples list": (lambda a, c: _content(a, {"num-examples": [1, 2]}), "is not a number"),
    "num-examples missing": (lambda a, c: _content(a, {"train-loss": 0.5}), "no 'num-examples'"),
    "metric nan": (lambda a, c: _content(a, {"num-examples": 50, "train-loss": float("nan")}), "metric 'train-loss'"),
    "no metrics": (lambda a, c: _with(c, metrics=None), "exactly one MetricRecord"),
    "two MetricRecords": (lambda a, c: _with(c, more=MetricRecord({"x": 1.0})), "exactly one MetricRecord"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_each_bad_reply_is_rejected_with_its_reason(case: str, model: ArrayRecord, model_cfg: dict) -> None:
    arrays = _np(model)
    good = _content(arrays, {"num-examples": 50, "train-loss": 0.5})
    make, fragment = BAD_CASES[case]
    screen = ReplyScreen(FedAvg(), spec_of(model), lambda msg: 100)
    bad = _reply(make(arrays, good), node=8)
    err = Message(
        Error(code=2, reason="boom"),
        reply_to=Message(content=RecordDict(), dst_node_id=9, message_type=MessageType.TRAIN),
    )
    result = screen.screen(1, [_reply(good), bad, err])
    assert [m.metadata.src_node_id for m in result.valid] == [7]
    assert len(result.errors) == 1
    assert len(result.rejected) == 1, result.rejected
    assert fragment in result.rejected[0][1]
    # and the aggregate is the good reply alone, bit for bit
    new, aggregated = _aggregate(FedAvg(), 1, result, 1, model)
    assert aggregated
    for k, v in _np(new).items():
        assert v.tobytes() == arrays[k].tobytes()


def test_colluders_adding_a_metric_key_reject_only_themselves(model: ArrayRecord) -> None:
    """The declared schema, not the majority: two colluders with an extra key are rejected, the
    honest reply is kept (the majority rule rejected it)."""
    arrays = _np(model)
    replies = [
        _reply(_content(arrays, {"num-examples": 10, "train-loss": 0.5}), node=1),
        _reply(_content(arrays, {"num-examples": 10, "train-loss": 0.4, "sneaky": 1.0}), node=2),
        _reply(_content(arrays, {"num-examples": 10, "train-loss": 0.3, "sneaky": 2.0}), node=3),
        _reply(_content(arrays, {"num-examples": 10}), node=4),  # a declared key missing
    ]
    result = ReplyScreen(FedAvg(), spec_of(model), metric_keys=("train-loss",)).screen(1, replies)
    assert [m.metadata.src_node_id for m in result.valid] == [1]
    reasons = {m.metadata.src_node_id: why for m, why in result.rejected}
    assert "metric keys ['sneaky'] are not among the method's declared reply metrics ['train-loss']" in reasons[2]
    assert "metric keys ['train-loss'] of the method's declared reply metrics are missing" in reasons[4]
    FedAvg().aggregate_train(1, result.valid)  # Flower's consistency check passes


def test_undeclared_metrics_keep_every_reply_and_drop_extra_keys(model: ArrayRecord) -> None:
    """A method without a schema: nobody is rejected for its metric keys; keys not every reply
    carries are dropped from copies of the replies that carry them."""
    arrays = _np(model)
    replies = [
        _reply(_content(arrays, {"num-examples": 10, "train-loss": 0.5}), node=1),
        _reply(_content(arrays, {"num-examples": 10, "train-loss": 0.4, "sneaky": 1.0}), node=2),
        _reply(_content(arrays, {"num-examples": 10, "train-loss": 0.3, "sneaky": 2.0}), node=3),
    ]
    result = ReplyScreen(FedAvg(), spec_of(model)).screen(1, replies)
    assert [m.metadata.src_node_id for m in result.valid] == [1, 2, 3] and not result.rejected
    assert all(sorted(m.content["metrics"].keys()) == ["num-examples", "train-loss"] for m in result.valid)
    assert "sneaky" in replies[1].content["metrics"]  # the original message is not changed
    _, metrics = FedAvg().aggregate_train(1, result.valid)
    assert metrics is not None and "sneaky" not in metrics


@pytest.mark.parametrize(
    ("strategy", "keys"),
    [
        ("fedavg", ["train-loss"]),
        ("feddip", ["ce-loss", "reg-grad-ratio", "train-loss"]),
        ("topk", ["kept-fraction", "train-loss"]),
        ("partial-update", ["partition-id", "pu-version", "train-loss"]),
    ],
)
def test_builtin_methods_declare_their_reply_metrics(strategy: str, keys: list[str]) -> None:
    from fedsparse.methods import method

    assert sorted(method(strategy).reply_metrics or ()) == keys


def test_all_replies_bad_keeps_the_model(model: ArrayRecord) -> None:
    arrays = _np(model)
    bad = [
        _reply(BAD_CASES[c][0](arrays, _content(arrays, {"num-examples": 5})), node=i) for i, c in enumerate(BAD_CASES)
    ]
    result = ReplyScreen(FedAvg(), spec_of(model), lambda msg: 100).screen(1, bad)
    assert result.valid == [] and len(result.rejected) == len(BAD_CASES)
    new, aggregated = _aggregate(FedAvg(), 1, result, 1, model)
    assert new is model and not aggregated


def test_a_hook_that_raises_rejects_instead_of_crashing(model: ArrayRecord) -> None:
    class Picky(FedAvg, MethodHooks):
        def validate_reply(self, server_round: int, msg: Message) -> str | None:
            raise ValueError("cannot decode")

    result = ReplyScreen(Picky(), spec_of(model)).screen(1, [_reply(_content(_np(model), {"num-examples": 3}))])
    assert result.valid == [] and "cannot decode" in result.rejected[0][1]


def test_universal_check_accepts_a_real_reply_layout(model: ArrayRecord) -> None:
    msg = _reply(_content(_np(model), {"num-examples": 3, "train-loss": 1.0}))
    assert universal_check(msg, 3) is None
    assert "exceeds" in str(universal_check(msg, 2))


# ------------------------------------------------------------------------------------------------
# fuzz: random malformed replies against every registered strategy
# ------------------------------------------------------------------------------------------------

UNIVERSAL = ["nan", "inf", "num-examples", "metric-nan", "no-metrics", "two-metrics", "undecodable", "lying-shape"]
STRUCTURAL = ["wrong-shape", "wrong-dtype", "drop-array", "extra-array", "extra-record", "rename-record"]


def _float_targets(msg: Message) -> list[tuple[str, str]]:
    return [
        (rn, k)
        for rn, rec in msg.content.array_records.items()
        for k, a in rec.items()
        if np.dtype(a.numpy().dtype).kind == "f" and a.numpy().size > 0
    ]


def _all_targets(msg: Message) -> list[tuple[str, str]]:
    return [(rn, k) for rn, rec in msg.content.array_records.items() for k in rec.keys()]


def _replace(msg: Message, content: RecordDict) -> Message:
    clone = copy.copy(msg)
    clone.content = content
    return clone


def _applicable(msg: Message, kinds: list[str]) -> list[str]:
    """NaN / inf need a floating-point array (packed codes have none: their hook checks the decoded values)."""
    return [k for k in kinds if k not in ("nan", "inf") or _float_targets(msg)]


def _mutate(msg: Message, kind: str, rng: np.random.Generator) -> Message:
    """A copy of a well-formed reply, broken in one way."""
    content = RecordDict({name: rec for name, rec in msg.content.items()})

    def pick(items: list[Any]) -> Any:
        return items[int(rng.integers(len(items)))]

    def set_array(rn: str, key: str, value: Any) -> None:
        rec = content[rn]
        content[rn] = ArrayRecord({k: (value if k == key else a) for k, a in rec.items()})

    metrics = dict(content["metrics"].items())
    if kind in ("nan", "inf"):
        rn, key = pick(_float_targets(msg))
        x = content[rn][key].numpy().copy()
        flat = x.reshape(-1)
        flat[int(rng.integers(flat.size))] = np.nan if kind == "nan" else (np.inf if rng.random() < 0.5 else -np.inf)
        set_array(rn, key, Array(x))
    elif kind == "num-examples":
        content["metrics"] = MetricRecord(
            {**metrics, "num-examples": pick([0, -7, 10**9, float("nan"), float("inf"), [3, 4]])}
        )
    elif kind == "metric-nan":
        content["metrics"] = MetricRecord({**metrics, "train-loss": float("nan")})
    elif kind == "no-metrics":
        del content["metrics"]
    elif kind == "two-metrics":
        content["evil"] = MetricRecord({"num-examples": 1})
    elif kind == "undecodable":
        rn, key = pick(_all_targets(msg))
        set_array(rn, key, _garbage_array(content[rn][key].numpy()))
    elif kind == "lying-shape":
        rn, key = pick(_all_targets(msg))
        set_array(rn, key, _lying_array(content[rn][key].numpy()))
    elif kind == "wrong-shape":
        rn, key = pick([t for t in _all_targets(msg) if msg.content[t[0]][t[1]].numpy().size > 1])
        x = content[rn][key].numpy()
        set_array(rn, key, Array(np.ascontiguousarray(x.reshape(-1)[: x.size // 2 + (1 if x.ndim > 1 else 0)])))
    elif kind == "wrong-dtype":
        rn, key = pick(_all_targets(msg))
        x = content[rn][key].numpy()
        other = {"f": np.float64, "u": np.int32, "i": np.int32, "b": np.uint8}.get(x.dtype.kind, np.float32)
        if np.dtype(other) == x.dtype:
            other = np.float32
        set_array(rn, key, Array(x.astype(other)))
    elif kind == "drop-array":
        rn, key = pick(_all_targets(msg))
        content[rn] = ArrayRecord({k: a for k, a in content[rn].items() if k != key})
    elif kind == "extra-array":
        rn, _ = pick(_all_targets(msg))
        content[rn] = ArrayRecord({**dict(content[rn].items()), "zz-backdoor": Array(np.ones(4, np.float32))})
    elif kind == "extra-record":
        content["zz-extra"] = ArrayRecord({"x": Array(np.ones(3, np.float32))})
    elif kind == "rename-record":
        rn, _ = pick(_all_targets(msg))
        rec = content[rn]
        del content[rn]
        content[f"{rn}-renamed"] = rec
    else:  # pragma: no cover
        raise AssertionError(kind)
    return _replace(msg, content)


def _strategy_cfg(name: str, out: Path) -> dict[str, Any]:
    return resolve_config({**TINY, "strategy": name, "out-dir": str(out)})


class _Round:
    """Two rounds of a strategy on the real ClientApp in process; round 2's replies are kept."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.cfg = _strategy_cfg(name, tmp)
        n = int(self.cfg["num-clients"])
        self.grid = MeteredGrid(EngineLikeGrid(make_client_app(self.cfg), n), Ledger(), measure_wire=False)
        self.grid.discover_partitions(n)
        self.model = ArrayRecord(initial_model(self.cfg).state_dict())
        strategy = build_strategy(self.cfg)
        arrays = self._round(strategy, 1, self.model)[0]
        self.arrays = arrays
        self.state = ckpt.pack_state(ckpt.strategy_state(strategy))
        probe = self.fresh()
        self.replies = self.grid.in_partition_order(self.grid.send_and_receive(self.messages(probe)))
        assert self.replies and not any(m.has_error() for m in self.replies), [
            m.error for m in self.replies if m.has_error()
        ]

    def _round(self, strategy: Any, t: int, arrays: ArrayRecord) -> tuple[ArrayRecord, Any]:
        with seeded_sampling(int(self.cfg["seed"]), t):
            msgs = list(strategy.configure_train(t, arrays, ConfigRecord({"server-round": t}), self.grid))
        replies = self.grid.in_partition_order(self.grid.send_and_receive(msgs))
        new, _ = strategy.aggregate_train(t, replies)
        return (new if new is not None else arrays), strategy

    def fresh(self) -> Any:
        """A strategy in the state after round 1 (through a checkpoint round trip)."""
        strategy = build_strategy(self.cfg)
        ckpt.load_strategy_state(strategy, ckpt.unpack_state(*self.state))
        return strategy

    def messages(self, strategy: Any) -> list[Message]:
        with seeded_sampling(int(self.cfg["seed"]), 2):
            return list(strategy.configure_train(2, self.arrays, ConfigRecord({"server-round": 2}), self.grid))

    def aggregate(self, replies: list[Message]) -> tuple[ArrayRecord, Any]:
        """A fresh strategy configures round 2 and aggregates ``replies`` through the loop's screen."""
        strategy = self.fresh()
        self.messages(strategy)
        screened = _screen_for(strategy, self.cfg, self.grid, self.model).screen(2, replies)
        arrays, _ = _aggregate(strategy, 2, screened, 1, self.arrays)
        return arrays, screened


@pytest.fixture(scope="module")
def rounds_cache() -> dict[str, _Round]:
    return {}


def _setup(name: str, cache: dict[str, _Round], tmp: Path) -> _Round:
    if name not in cache:
        cache[name] = _Round(name, tmp)
    return cache[name]


def _bitwise(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for k in a.keys():
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k


def _finite(a: ArrayRecord) -> bool:
    return all(np.isfinite(x).all() for x in (v.numpy() for v in a.values()) if x.dtype.kind == "f")


def _checks_structure(strategy: Any) -> bool:
    from fedsparse.validation import is_flower_strategy

    return isinstance(strategy, MethodHooks) or is_flower_strategy(strategy)


@pytest.mark.parametrize("name", strategy_names())
def test_fuzz_malformed_replies_never_reach_the_model(name: str, rounds_cache: dict, tmp_path: Path) -> None:
    r = _setup(name, rounds_cache, tmp_path)
    strategy = r.fresh()
    kinds = UNIVERSAL + (STRUCTURAL if _checks_structure(strategy) else [])
    rng = np.random.default_rng(zlib.crc32(name.encode()))

    # well-formed replies pass: validation must not break the strategy
    _, screened = r.aggregate(r.replies)
    assert len(screened.valid) == len(r.replies), screened.rejected
    good_only, _ = r.aggregate(r.replies[:1])
    nothing, _ = r.aggregate([])

    for _trial in range(6):
        chosen = [_applicable(m, kinds) for m in r.replies]
        chosen = [ks[int(rng.integers(len(ks)))] for ks in chosen]
        bad = [_mutate(m, kind, rng) for m, kind in zip(r.replies, chosen)]
        # every malformed reply is rejected, alone ...
        arrays, screened = r.aggregate(bad)
        accepted = {m.metadata.src_node_id for m in screened.valid}
        assert not accepted, [k for k, m in zip(chosen, bad) if m.metadata.src_node_id in accepted]
        assert len(screened.rejected) == len(bad)
        # ... so all-bad rounds end exactly like rounds in which nothing arrived, with a finite model
        _bitwise(arrays, nothing)
        assert _finite(arrays)
        # and bad replies next to a good one leave exactly the good one's aggregate
        mixed, screened = r.aggregate([r.replies[0], *bad[1:]])
        assert len(screened.valid) == 1
        _bitwise(mixed, good_only)


@pytest.mark.parametrize("name", strategy_names())
def test_fuzz_structural_damage_needs_a_validate_reply_hook(name: str, rounds_cache: dict, tmp_path: Path) -> None:
    """Wrong shapes / dtypes / missing or extra arrays: checked by the strategy's hook (or the generic
    check for Flower's strategies). A strategy without the hook is reported here, not hidden."""
    r = _setup(name, rounds_cache, tmp_path)
    if not _checks_structure(r.fresh()):
        pytest.xfail(f"strategy {name!r} defines no validate_reply(): structural damage is not checked")
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
    for kind in STRUCTURAL:
        bad = [_mutate(m, kind, rng) for m in r.replies]
        arrays, screened = r.aggregate(bad)
        assert screened.valid == [], f"{kind}: accepted"
        assert _finite(arrays)


def test_magnitude_bound_rejects_finite_but_huge_values(model: ArrayRecord) -> None:
    """``reply-max-abs``: a finite value beyond the bound is rejected with the array named; the bound
    0 / None turns it off; integer arrays are not bounded."""
    arrays = _np(model)
    name = next(iter(arrays))
    huge = {
        k: (np.where(np.arange(x.size).reshape(x.shape) == 0, 3.0e38, x).astype(x.dtype) if k == name else x)
        for k, x in arrays.items()
    }
    good, bad = _reply(_content(arrays, {"num-examples": 5})), _reply(_content(huge, {"num-examples": 5}))
    screened = ReplyScreen(FedAvg(), spec_of(model), max_abs=1e6).screen(1, [good, bad])
    assert screened.valid == [good]
    reason = screened.rejected[0][1]
    assert repr(name) in reason and "reply-max-abs" in reason and "3e+38" in reason
    assert ReplyScreen(FedAvg(), spec_of(model), max_abs=None).screen(1, [bad]).valid == [bad]
    assert check_magnitude({"x": np.array([5, 10**9])}, 1e6) is None  # integers: not bounded
    assert check_magnitude({"x": np.array([1.0, -2e6])}, 1e6) is not None  # the magnitude, not the sign
    assert check_magnitude({"x": np.array([1.0, -2e6])}, 0.0) is None


def test_a_non_finite_aggregate_is_discarded(model: ArrayRecord) -> None:
    """Finite but huge values can overflow in the average: the loop keeps the previous model."""

    class Overflowing(FedAvg):
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            return ArrayRecord({k: Array(np.full_like(a.numpy(), np.inf)) for k, a in model.items()}), None

    good = _reply(_content(_np(model), {"num-examples": 5}))
    screened = ReplyScreen(FedAvg(), spec_of(model)).screen(1, [good])
    new, aggregated = _aggregate(Overflowing(), 1, screened, 1, model)
    assert new is model and not aggregated
