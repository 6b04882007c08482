"""The table of configuration errors in ``docs/errors.md``, generated from the real messages.

Every row is produced by *running* the bad input through the code that rejects it (resolving a
configuration, reading a file, resuming a run, parsing a bench suite) and printing the
:class:`~fedsparse.config.ConfigError` it raises, so the documentation cannot drift from the code.
``tests/test_errors_table.py`` checks that

* every case below raises (a ConfigError, or DatasetNotFoundError for missing data),
* the generated block of ``docs/errors.md`` is exactly :func:`render` (regenerate with
  ``fedsparse dev errors-table --write``, from the checkout's root),
* every ``raise ConfigError(...)`` in fedsparse/, strategies/ and clients/ is reached by some case
  (or listed in :data:`NOT_TABULATED` with the reason) — so a new check cannot go undocumented.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsparse.methods import BUILTIN, methods, origin

#: Where the packages are (a checkout or site-packages): raise sites are named relative to it.
ROOT = Path(__file__).resolve().parents[2]
#: The document, relative to the working directory (the checkout's root): nothing here assumes a
#: source checkout around the installed package.
DOC = Path("docs") / "errors.md"
BEGIN = "<!-- BEGIN GENERATED: fedsparse dev errors-table --write -->"
END = "<!-- END GENERATED -->"
MAX_MESSAGE = 400  # longer messages (e.g. the list of every key) are cut in the table, marked "…"

#: Raise sites no case reaches, as (file, function, a fragment of the raise statement): why.
NOT_TABULATED: dict[tuple[str, str, str], str] = {
    (
        "fedsparse/simulation.py",
        "preflight",
        "no CUDA device",
    ): "`client-gpus > 0` without CUDA: only on a machine without a GPU (see below the table)",
    (
        "fedsparse/simulation.py",
        "preflight",
        "CPUs of this machine",
    ): "`client-cpus` above this machine's CPU count: the message names this machine's cores",
    (
        "fedsparse/bench/runner.py",
        "make_slots",
        "cores available",
    ): "`--jobs N` above the core count: the message names this machine's cores (see below the table)",
    (
        "fedsparse/config.py",
        "_check_dataset_fits",
        "cannot take",
    ): "a model that cannot take the dataset's input size: no registered model/dataset pair triggers it today",
    (
        "fedsparse/rundir.py",
        "prepare_out_dir",
        "is not writable",
    ): "an `--out` the user may not write: depends on who runs it (root writes anywhere), so no fixed case shows it",
    (
        "fedsparse/bench/runner.py",
        "run_suite",
        "subprocess runner only",
    ): "a programming error (a custom `runner=` with `shared_ray=True` in the Python API), not a user input",
    (
        "fedsparse/bench/sharedray.py",
        "_ray_binary",
        "no `ray` command",
    ): "`--shared-ray` where Ray's command is not installed: fedsparse's own install always has it",
}


@dataclass(frozen=True)
class Case:
    """One bad input: what it is, how a user writes it, and the call that rejects it."""

    section: str
    what: str
    given: str
    run: Callable[[], Any]


# ------------------------------------------------------------------------------------------------
# helpers the cases use
# ------------------------------------------------------------------------------------------------


def _resolve(**over: Any) -> Callable[[], Any]:
    def run() -> Any:
        from fedsparse.config import resolve_config

        return resolve_config({}, over)

    return run


def _set(over: dict[str, Any]) -> str:
    from fedsparse.config import to_toml

    return "; ".join(line for line in to_toml(over).strip().splitlines())


def _write(path: str, text: str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _run_dir(name: str, **over: Any) -> Path:
    """A run directory as a checkpointed run leaves it: config.toml and checkpoint.npz (round 1)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedsparse import checkpoint as ckpt
    from fedsparse.accounting import Ledger
    from fedsparse.config import resolve_config, to_toml

    out = Path(name)
    cfg = resolve_config({"checkpoint-every": 1, "out-dir": str(out), **over})
    _write(str(out / "config.toml"), to_toml(cfg))
    ckpt.save_checkpoint(
        out,
        ckpt.Checkpoint(
            1,
            dict(cfg),
            ArrayRecord({"w": Array(np.zeros(1, np.float32))}),
            {"kind": "attributes", "state": {}},
            [],
            Ledger(),
            ckpt.capture_rng(),
            0.0,
        ),
    )
    return out


def _resume(name: str, *, edit: Callable[[Path], object] | None = None, **over: Any) -> Callable[[], Any]:
    def run() -> Any:
        from fedsparse.checkpoint import resume_config

        out = _run_dir(name)
        if edit is not None:
            edit(out)
        return resume_config(out, overrides=over or None)

    return run


def _loop_resume() -> Any:
    from fedsparse.config import resolve_config
    from fedsparse.server import _resume as loop_resume

    out = _run_dir("run")
    return loop_resume(out, resolve_config({"checkpoint-every": 1, "seed": 1}), None, None)  # type: ignore[arg-type]  # the config conflict is raised before strategy and grid are used


def _suite(data: dict[str, Any]) -> Callable[[], Any]:
    def run() -> Any:
        from fedsparse.bench import parse_suite

        return parse_suite(data, where="suite s.toml")

    return run


def _suite_runs(**select: Any) -> Callable[[], Any]:
    def run() -> Any:
        from fedsparse.bench import parse_suite

        suite = parse_suite({"methods": [{"name": "fedavg", "strategy": "fedavg"}], "seeds": [0]}, where="suite s.toml")
        return suite.runs(**select)

    return run


def _suite_resolve() -> Any:
    from fedsparse.bench import parse_suite, resolve_runs

    suite = parse_suite({"methods": [{"name": "fedavg", "strategy": "fedavg", "lr": -1.0}]}, where="suite s.toml")
    return resolve_runs(suite.runs())


def _bench_nothing_registered() -> Any:
    from fedsparse.bench import parse_suite, run_suite

    suite = parse_suite({"methods": [{"name": "later", "strategy": "not-yet-written"}]}, where="suite s.toml")
    return run_suite(suite, Path("bench-out"), skip_unavailable=True, report=lambda line: None)


def _flat(section: str, what: str, given: str, run: Callable[[], Any]) -> Case:
    return Case(section, what, given, run)


# ------------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def value_cases() -> list[Case]:
    """Per key: a value outside what it allows (a bad choice, below the minimum, above the maximum)."""
    from fedsparse.config import SCHEMA, _choices, defaults

    defaults()  # registers every strategy's keys
    out = []
    for name, key in SCHEMA.items():
        bad: list[Any] = []
        choices = key.choices
        if choices is None and name in ("dataset", "model", "strategy"):
            choices = _choices(name)
        if choices is not None:
            bad.append("bogus")
        else:
            if key.minimum is not None:
                if key.exclusive_minimum:
                    bad.append(key.kind(key.minimum))
                else:
                    bad.append(key.kind(key.minimum) - (1 if key.kind is int else 0.5))
            if key.maximum is not None:
                bad.append(key.kind(key.maximum) + (1 if key.kind is int else 0.5))
        for value in bad:
            out.append(
                _flat("value", f"`{name}` [{key.section}]", f"{name} = {_toml_value(value)}", _resolve(**{name: value}))
            )
    return out


def type_cases() -> list[Case]:
    return [
        _flat("type", "an integer key given a word", 'rounds = "ten"', _resolve(rounds="ten")),
        _flat("type", "an integer key given a fraction", "rounds = 2.5", _resolve(rounds=2.5)),
        _flat("type", "a float key given a word", 'lr = "fast"', _resolve(lr="fast")),
        _flat("type", "a boolean key given a word", 'wire-bytes = "maybe"', _resolve(**{"wire-bytes": "maybe"})),
        _flat("type", "a string key given a number", "out-dir = 3", _resolve(**{"out-dir": 3})),
    ]


def method_cases() -> list[Case]:
    """The error cases fedsparse's own methods declare, in discovery order (a plug-in's belong in
    its own documentation, not in fedsparse's table)."""
    out: list[Case] = []
    for name, method in methods().items():
        if origin(name) != BUILTIN:
            continue
        for case in method.error_cases:
            if case.run is not None:
                out.append(_flat("other", case.what, case.given or case.what, case.run))
                continue
            over = {"strategy": name, **dict(case.overrides or {})}
            out.append(_flat("other", case.what, case.given or _set(over), _resolve(**over)))
    return out


def other_cases() -> list[Case]:
    from fedsparse.config import load_toml, parse_overrides

    c: list[Case] = []

    def add(what: str, given: str, run: Callable[[], Any]) -> None:
        c.append(_flat("other", what, given, run))

    # keys, files, --set
    add("a key that does not exist (a close one is suggested)", "num-client = 5", _resolve(**{"num-client": 5}))
    add("`--set` without `=`", "--set lr", lambda: parse_overrides(["lr"]))
    add("a config file that does not exist", "fedsparse run missing.toml", lambda: load_toml("missing.toml"))
    add(
        "a config file that is not TOML",
        "fedsparse run bad.toml (holding: lr = )",
        lambda: load_toml(_write("bad.toml", "lr = \n")),
    )
    add(
        "a config file with sub-tables",
        "fedsparse run nested.toml (holding: [run])",
        lambda: load_toml(_write("nested.toml", "[run]\nlr = 0.1\n")),
    )
    # the federation
    add(
        "more clients per round than clients",
        _set({"num-clients": 10, "clients-per-round": 11}),
        _resolve(**{"num-clients": 10, "clients-per-round": 11}),
    )
    add("no local work", _set({"local-epochs": 0, "local-steps": 0}), _resolve(**{"local-epochs": 0, "local-steps": 0}))
    add(
        "more classes per client than the dataset has",
        _set({"partition": "pathological", "classes-per-client": 11}),
        _resolve(partition="pathological", **{"classes-per-client": 11}),
    )

    def impossible_split() -> Any:
        from fedsparse.config import resolve_config
        from fedsparse.simulation import preflight

        return preflight(resolve_config({"partition": "dirichlet", "num-clients": 50000, "clients-per-round": 2}))

    add(
        "a split that leaves a client too small (checked before Ray starts)",
        _set({"partition": "dirichlet", "num-clients": 50000, "clients-per-round": 2}),
        impossible_split,
    )

    def no_data() -> Any:
        from fedsparse.config import resolve_config
        from fedsparse.simulation import preflight

        Path("empty").mkdir(exist_ok=True)
        return preflight(resolve_config({"data-dir": "empty", "dataset": "cifar100"}))

    add("a dataset that is not on disk (DatasetNotFoundError)", '--data-dir empty --set dataset="cifar100"', no_data)

    def bad_index_kinds() -> Any:
        from fedsparse.codec import INDEX_KINDS_ENV
        from fedsparse.config import resolve_config
        from fedsparse.simulation import preflight

        before = os.environ.get(INDEX_KINDS_ENV)
        os.environ[INDEX_KINDS_ENV] = "bitmap,huffman"
        try:
            return preflight(resolve_config({}))
        finally:
            if before is None:
                del os.environ[INDEX_KINDS_ENV]
            else:
                os.environ[INDEX_KINDS_ENV] = before

    add(
        "the benchmark switch `FEDSPARSE_INDEX_KINDS` naming an unknown kind",
        "FEDSPARSE_INDEX_KINDS=bitmap,huffman fedsparse run",
        bad_index_kinds,
    )
    # the paper's setting: client momentum, weight decay per model
    for what, over in (
        (
            "`client-momentum` with a method whose client step does not keep momentum",
            {"strategy": "feddip", "client-momentum": "slot", "momentum": 0.9},
        ),
        ("`client-momentum` without momentum", {"client-momentum": "slot", "momentum": 0.0}),
        ("`client-momentum` with Adam", {"client-momentum": "client", "optimizer": "adam", "momentum": 0.9}),
        (
            "`persist-momentum` (alias of `client` momentum) against another mode",
            {"strategy": "fedluar", "persist-momentum": True, "client-momentum": "slot", "momentum": 0.9},
        ),
        (
            "`weight-decay-rule` set beside a `weight-decay`",
            {"model": "cnn", "weight-decay-rule": "fedluar-reference", "weight-decay": 1e-4},
        ),
        ("`weight-decay-rule` for a model the reference does not set", {"weight-decay-rule": "fedluar-reference"}),
    ):
        add(what, _set(over), _resolve(**over))
    # reliability
    add("`min-replies` above the sample", _set({"min-replies": 6}), _resolve(**{"min-replies": 6}))
    add("`fail-clients`: not ROUND:PARTITION", 'fail-clients = "2-0"', _resolve(**{"fail-clients": "2-0"}))
    add("`fail-clients`: a bad round", 'fail-clients = "0:1"', _resolve(**{"fail-clients": "0:1"}))
    add("`fail-clients`: an unknown mode", 'fail-clients = "1:1:explode"', _resolve(**{"fail-clients": "1:1:explode"}))
    add(
        "`fail-clients`: a partition that does not exist", 'fail-clients = "1:99"', _resolve(**{"fail-clients": "1:99"})
    )
    add("`fail-clients`: a round after the last", 'fail-clients = "500:1"', _resolve(**{"fail-clients": "500:1"}))
    add(
        "`fail-clients`: `scale` with a strategy whose reply is neither a plain model nor a FedDIP codec model",
        'strategy = "topk"; fail-clients = "1:1:scale"',
        _resolve(strategy="topk", **{"fail-clients": "1:1:scale"}),
    )
    # robust aggregation (docs/reliability.md, section 4b)
    add(
        "`aggregation`: Krum with too few clients a round (n < 2f + 3)",
        'aggregation = "krum"; num-malicious = 2; clients-per-round = 5',
        _resolve(aggregation="krum", **{"num-malicious": 2, "clients-per-round": 5}),
    )
    add(
        "`aggregation`: Bulyan with too few clients a round (n < 4f + 3)",
        'aggregation = "bulyan"; num-malicious = 1; clients-per-round = 5',
        _resolve(aggregation="bulyan", **{"num-malicious": 1, "clients-per-round": 5}),
    )
    add(
        "`krum-keep` above the clients a round",
        'aggregation = "multikrum"; krum-keep = 9; clients-per-round = 5',
        _resolve(aggregation="multikrum", **{"krum-keep": 9, "clients-per-round": 5}),
    )
    add("`trim-beta` of a half or more", "trim-beta = 0.5", _resolve(**{"trim-beta": 0.5}))
    add("`clip-norm` neither a number > 0 nor auto", 'clip-norm = "max"', _resolve(**{"clip-norm": "max"}))
    add(
        "`max-in-flight` neither auto nor a count >= 0", 'max-in-flight = "lots"', _resolve(**{"max-in-flight": "lots"})
    )
    add(
        "`aggregation` other than mean with a strategy that cannot decode its replies",
        "apply_rule(<MethodHooks strategy without use_aggregation>, median)",
        _opaque_rule,
    )
    add(
        "`aggregation` other than mean with a Flower strategy outside the FedAvg family",
        "apply_rule(<a Strategy that is not a FedAvg>, median)",
        _foreign_rule,
    )
    # checkpoints and their message log (docs/reliability.md, section 1)
    add(
        "the newest checkpoint and the previous one both unreadable",
        "fedsparse run --resume run (checkpoint.npz and checkpoint.prev.npz damaged)",
        _checkpoints_unreadable,
    )
    add(
        "a checkpoint whose message log is shorter than it refers to (no previous one)",
        "fedsparse run --resume run (checkpoint-log.jsonl cut)",
        _checkpoint_log_short,
    )
    add(
        "a message log that does not match its checkpoint (no previous one)",
        "fedsparse run --resume run (checkpoint-log.jsonl edited)",
        _checkpoint_log_edited,
    )
    # non-finite settings and the output directory
    add("a float setting that is NaN or infinite (any float key)", "lr = nan", _resolve(lr=float("nan")))
    add("`--out` is a file", "fedsparse run --out afile", _out_dir("afile", make_file=True))
    add("`--out` cannot be created", "fedsparse run --out afile/below", _out_dir("afile/below", make_file=True))
    add(
        "`--out` holds a run (neither --resume nor --overwrite)",
        "fedsparse run --out run (a finished run)",
        _out_dir("run", make_run=True),
    )
    # damaged dataset files: one message naming the file, never a traceback
    add(
        "a truncated dataset file (IDX)",
        "fedsparse run --data-dir data (data/fashion-mnist/train-images-idx3-ubyte cut short)",
        _dataset_damaged("fashion-mnist"),
    )
    add(
        "a damaged CIFAR batch",
        "fedsparse run --data-dir data --set dataset=cifar10 (data/cifar-10-batches-py/data_batch_1 garbled)",
        _dataset_damaged("cifar10"),
    )
    # resume
    add("`--resume` of a directory that does not exist", "fedsparse run --resume nowhere", _resume_missing)
    add("`--resume` of a directory without config.toml", "fedsparse run --resume notarun", _resume_not_a_run)
    add(
        "`--resume` of a run without a checkpoint",
        "fedsparse run --resume run (checkpoint-every = 0)",
        _resume("run", edit=lambda d: (d / "checkpoint.npz").unlink()),
    )
    add(
        "`--resume` of a damaged checkpoint",
        "fedsparse run --resume run (checkpoint.npz truncated)",
        _resume("run", edit=lambda d: (d / "checkpoint.npz").write_bytes(b"PK\x03\x04")),
    )
    add(
        "`--resume` with a setting that differs from the run's",
        "fedsparse run --resume run --set lr=0.1",
        _resume("run", lr=0.1),
    )
    add(
        "`--resume` after config.toml was edited",
        "fedsparse run --resume run (config.toml: seed = 1)",
        _resume(
            "run",
            edit=lambda d: _write(
                str(d / "config.toml"), (d / "config.toml").read_text().replace("seed = 0", "seed = 1")
            ),
        ),
    )
    add("`--resume` with `--out` elsewhere", "fedsparse run --resume run --out other", _resume_out_elsewhere)
    add(
        "a checkpoint of another configuration, met by the round loop",
        "(flwr run with a foreign checkpoint)",
        _loop_resume,
    )
    add("resuming without an output directory", "run_server(..., out_dir=None, resume=True)", _loop_resume_no_dir)
    add(
        "a checkpoint the strategy cannot load",
        "(a state_dict() saved, a strategy without load_state_dict())",
        _strategy_cannot_load,
    )
    add("a checkpoint written by another format version", "fedsparse run --resume run (older fedsparse)", _old_format)
    # methods: each declares its own bad inputs (fedsparse.methods.Method.error_cases)
    c.extend(method_cases())
    # fedsparse bench suites
    add("bench: an unknown top-level entry", "suite: rounds = 3 at top level", _suite({"rounds": 3, "methods": []}))
    add("bench: base is not a table", "suite: base = 3", _suite({"base": 3}))
    add("bench: a list inside base", "suite: [base] lr = [0.1]", _suite({"base": {"lr": [0.1]}}))
    add("bench: bad seeds", "suite: seeds = [-1]", _suite({"seeds": [-1]}))
    add("bench: a repeated seed", "suite: seeds = [0, 0]", _suite({"seeds": [0, 0]}))
    add("bench: splits is not a table of tables", "suite: splits = 3", _suite({"splits": 3}))
    add("bench: a split name with a path separator", 'suite: [splits."a/b"]', _suite({"splits": {"a/b": {}}}))
    add(
        "bench: a suite name with a path separator",
        'suite: name = "a/b"',
        _suite({"name": "a/b", "methods": [{"name": "x", "strategy": "fedavg"}]}),
    )
    add("bench: no methods", "suite without [[methods]]", _suite({}))
    add("bench: a method that is not a table", "suite: methods = [3]", _suite({"methods": [3]}))
    add(
        "bench: a method defined twice",
        "suite: two [[methods]] named fedavg",
        _suite({"methods": [{"name": "fedavg", "strategy": "fedavg"}, {"name": "fedavg", "strategy": "fedprox"}]}),
    )
    add("bench: a method without a strategy", 'suite: [[methods]] name = "x"', _suite({"methods": [{"name": "x"}]}))
    add(
        "bench: a list inside a method",
        "suite: [[methods]] lr = [0.1]",
        _suite({"methods": [{"name": "x", "strategy": "fedavg", "lr": [0.1]}]}),
    )
    add(
        "bench: a method limited to splits the suite lacks",
        'suite: [[methods]] splits = ["noniid"]',
        _suite({"methods": [{"name": "x", "strategy": "fedavg", "splits": ["noniid"]}]}),
    )
    add(
        "bench: a method limited to seeds the suite lacks",
        "suite: seeds = [0]; [[methods]] seeds = [5]",
        _suite({"seeds": [0], "methods": [{"name": "x", "strategy": "fedavg", "seeds": [5]}]}),
    )
    add(
        "bench: a baseline that is not a method",
        'suite: baseline = "fedprox"',
        _suite({"baseline": "fedprox", "methods": [{"name": "x", "strategy": "fedavg"}]}),
    )
    add("bench: a suite file that does not exist", "fedsparse bench missing.toml", _suite_file_missing)
    add("bench: a suite file that is not TOML", "fedsparse bench bad.toml", _suite_file_bad)
    add(
        "bench: `--only` a method the suite lacks",
        "fedsparse bench s.toml --only fedsgd",
        _suite_runs(methods=["fedsgd"]),
    )
    add("bench: `--seeds` the suite lacks", "fedsparse bench s.toml --seeds 9", _suite_runs(seeds=[9]))
    add("bench: a bad value in one run", "suite: [[methods]] lr = -1.0", _suite_resolve)
    add("bench: `--jobs 0`", "fedsparse bench s.toml --jobs 0", _jobs_zero)
    add("bench: `--shared-ray` with several jobs", "fedsparse bench s.toml --shared-ray --jobs 2", _shared_ray_jobs)
    add(
        "bench: no method with a registered strategy",
        "suite: only strategies not written yet",
        _bench_nothing_registered,
    )
    return c


def _resume_missing() -> Any:
    from fedsparse.checkpoint import resume_config

    return resume_config("nowhere")


def _resume_not_a_run() -> Any:
    from fedsparse.checkpoint import resume_config

    Path("notarun").mkdir(exist_ok=True)
    return resume_config("notarun")


def _resume_out_elsewhere() -> Any:
    from fedsparse.simulation import simulate

    _run_dir("run")
    return simulate(None, out_dir="other", resume="run")


def _loop_resume_no_dir() -> Any:
    from fedsparse.config import resolve_config
    from fedsparse.server import _resume as loop_resume

    return loop_resume(None, resolve_config({}), None, None)  # type: ignore[arg-type]  # no directory: raised before strategy and grid are used


def _foreign_rule() -> Any:
    from flwr.serverapp.strategy import Strategy

    from fedsparse.robust import AggregationRule, apply_rule

    class Foreign(Strategy):
        """A Flower strategy outside the FedAvg family (its abstract methods are never called)."""

    Foreign.__abstractmethods__ = frozenset()
    return apply_rule(Foreign(), AggregationRule("median"))  # type: ignore[abstract]


def _checkpoints(name: str, rounds: int) -> Path:
    """A directory with checkpoints after rounds 1..``rounds`` (the last two: newest and previous)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedsparse.accounting import Ledger
    from fedsparse.checkpoint import Checkpoint, save_checkpoint

    out = Path(name)
    for r in range(1, rounds + 1):
        rows = [{"round": i, "test_accuracy": 0.5} for i in range(1, r + 1)]
        arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
        save_checkpoint(out, Checkpoint(r, {"rounds": 5}, arrays, {"kind": "state_dict", "state": {}}, rows, Ledger()))
    return out


def _checkpoints_unreadable() -> Any:
    from fedsparse.checkpoint import checkpoint_path, load_checkpoint, previous_checkpoint_path

    out = _checkpoints("both", 2)
    checkpoint_path(out).write_bytes(b"not a zip")
    previous_checkpoint_path(out).write_bytes(b"not a zip either")
    return load_checkpoint(out)


def _checkpoint_log_short() -> Any:
    from fedsparse.checkpoint import load_checkpoint, log_path

    out = _checkpoints("short", 1)
    log_path(out).write_bytes(log_path(out).read_bytes()[:10])
    return load_checkpoint(out)


def _checkpoint_log_edited() -> Any:
    from fedsparse.checkpoint import load_checkpoint, log_path

    out = _checkpoints("edited", 1)
    log_path(out).write_bytes(log_path(out).read_bytes().replace(b'"round":1', b'"round":7', 1))
    return load_checkpoint(out)


def _opaque_rule() -> Any:
    from fedsparse.hooks import MethodHooks
    from fedsparse.robust import AggregationRule, apply_rule

    return apply_rule(MethodHooks(), AggregationRule("median"))  # type: ignore[arg-type]  # the hooks alone


def _strategy_cannot_load() -> Any:
    from flwr.serverapp.strategy import FedAvg

    from fedsparse.checkpoint import load_strategy_state

    return load_strategy_state(FedAvg(), {"kind": "state_dict", "state": {}})


def _old_format() -> Any:
    import numpy as np

    from fedsparse.checkpoint import load_checkpoint

    out = Path("old")
    out.mkdir(exist_ok=True)
    np.savez(out / "checkpoint.npz", meta=np.frombuffer(b'{"format": 0}', dtype=np.uint8))
    return load_checkpoint(out)


def _out_dir(path: str, *, make_file: bool = False, make_run: bool = False) -> Callable[[], Any]:
    def run() -> Any:
        from fedsparse.rundir import prepare_out_dir

        if make_file:
            _write("afile", "x")
        if make_run:
            _write(f"{path}/config.toml", "seed = 0\n")
            _write(f"{path}/summary.json", "{}\n")
        return prepare_out_dir(path)

    return run


def _dataset_damaged(name: str) -> Callable[[], Any]:
    """The dataset's files present under ``data/``, the first one damaged; loaded as ``fedsparse run``
    loads it before Ray starts (``preflight``)."""

    def run() -> Any:
        from fedsparse.config import resolve_config
        from fedsparse.data import inmemory
        from fedsparse.data.paths import _CIFAR_FILES, IDX_FILES, candidate_dirs
        from fedsparse.simulation import preflight

        folder = candidate_dirs(name, Path("data"))[0]
        files = IDX_FILES if name in ("fashion-mnist", "mnist") else _CIFAR_FILES[name]
        for i, stem in enumerate(files):
            _write(str(folder / stem), "\x00\x00\x08" if i == 0 else "x")  # a header cut short / no pickle
        inmemory.clear_cache()
        return preflight(resolve_config({"dataset": name, "data-dir": "data"}))

    return run


def _suite_file_missing() -> Any:
    from fedsparse.bench import load_suite

    return load_suite("missing.toml")


def _suite_file_bad() -> Any:
    from fedsparse.bench import load_suite

    return load_suite(_write("bad.toml", "methods = [\n"))


def _shared_ray_jobs() -> Any:
    from fedsparse.bench import parse_suite
    from fedsparse.bench.runner import run_suite

    suite = parse_suite({"methods": [{"name": "fedavg", "strategy": "fedavg"}], "seeds": [0]}, where="suite s.toml")
    return run_suite(suite, Path("shared-ray"), jobs=2, shared_ray=True)


def _jobs_zero() -> Any:
    from fedsparse.bench import make_slots

    return make_slots(0)


def cases() -> list[Case]:
    return value_cases() + type_cases() + other_cases()


# ------------------------------------------------------------------------------------------------
# running and rendering
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _sandbox() -> Iterator[str]:
    """Run a case in an empty temporary directory, so file names in messages are short and stable
    (a message that resolved a path has the directory's own prefix removed by :func:`run_case`)."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fedsparse-errors-") as tmp:
        os.chdir(tmp)
        try:
            yield os.path.realpath(tmp)
        finally:
            os.chdir(old)


@dataclass(frozen=True)
class Outcome:
    case: Case
    message: str
    error: type
    sites: tuple[tuple[str, int], ...]  # (file relative to the repository, line) of the raise, and of its causes


def _sites(err: BaseException | None) -> tuple[tuple[str, int], ...]:
    """Where ``err`` was raised, and the errors it was raised from (a re-raise wraps a check)."""
    out = []
    while err is not None and err.__traceback__ is not None:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        try:
            rel = str(Path(frame.filename).resolve().relative_to(ROOT))
        except ValueError:
            rel = frame.filename
        out.append((rel, int(frame.lineno or 0)))
        err = err.__cause__
    return tuple(out)


def run_case(case: Case) -> Outcome:
    """Run one case; raise AssertionError if it does not fail the documented way."""
    from fedsparse.config import ConfigError
    from fedsparse.data import DatasetFormatError, DatasetNotFoundError

    with _sandbox() as here:
        try:
            case.run()
        except (ConfigError, DatasetNotFoundError, DatasetFormatError) as err:
            return Outcome(case, str(err).replace(here + os.sep, ""), type(err), _sites(err))
    raise AssertionError(f"{case.section} case {case.what!r} ({case.given}) raised no ConfigError")


def _cell(text: str) -> str:
    text = " ".join(str(text).split())
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    return text.replace("|", "\\|")


def _data_dir_free(message: str) -> str:
    """The message goes on to list the folders searched on this machine: keep its first line."""
    return message.splitlines()[0] + " … (then every folder searched and every way to get the data)"


def render(outcomes: list[Outcome] | None = None) -> str:
    """The generated block of docs/errors.md."""
    outcomes = outcomes if outcomes is not None else [run_case(c) for c in cases()]
    lines = [BEGIN, ""]
    sections = [
        ("value", "Values outside what a key allows", "Key", "Given"),
        ("type", "Values of the wrong type", "What", "Given"),
        ("other", "Combinations, files, resume, strategies, bench suites", "What", "Given"),
    ]
    for section, title, first, second in sections:
        rows = [o for o in outcomes if o.case.section == section]
        lines += [f"### {title} ({len(rows)})", "", f"| {first} | {second} | Message |", "|---|---|---|"]
        for o in rows:
            message = _data_dir_free(o.message) if o.error.__name__ == "DatasetNotFoundError" else o.message
            if o.error.__name__ != "ConfigError":
                message = f"({o.error.__name__}) {message}"
            lines.append(f"| {_cell(o.case.what)} | `{_cell(o.case.given)}` | {_cell(message)} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def generated_block(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def write(doc: Path = DOC) -> None:
    """Replace the generated block of ``doc`` with the current table."""
    text = doc.read_text()
    doc.write_text(text.replace(generated_block(text), render()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--doc", type=Path, default=DOC, help=f"the document holding the table (default: {DOC})")
    parser.add_argument(
        "--write", action="store_true", help="rewrite the document's generated block (else print the table)"
    )


def command(args: argparse.Namespace) -> int:
    """``fedsparse dev errors-table``."""
    if args.write:
        if not args.doc.is_file():
            print(
                f"fedsparse dev errors-table: {args.doc} not found; run it from the checkout's root or pass --doc",
                file=sys.stderr,
            )
            return 2
        write(args.doc)
        print(f"updated {args.doc}")
    else:
        print(render())
    return 0
