"""Method plug-ins: how the core finds strategies and client steps without importing them by name.

A *method* (FedDIP, FedLUAR, Top-k, ...) is one strategy module and one client module. The strategy
module declares a :class:`Method` — its name, how to build the Flower strategy from a run config,
its configuration keys, its cross-checks, its error cases and where its client step lives — and
the package that ships it names that declaration under the entry-point group
:data:`METHODS_GROUP` in its ``pyproject.toml``::

    [project.entry-points."fedsparse.methods"]
    feddip = "strategies.feddip:METHOD"

So a third-party package adds a method with ``pip install`` and no edit to fedsparse, and the core
(:mod:`fedsparse.config`, :mod:`fedsparse.server`, the ClientApp) reaches every method — the
built-in ones included — through :func:`methods` alone. The layering rule this keeps
(``fedsparse`` → nothing of ours; ``strategies`` and ``clients`` → ``fedsparse`` only) is in
docs/architecture.md and enforced by tests/test_architecture.py.

Strategies get fedsparse's per-round hooks by inheriting :class:`fedsparse.hooks.MethodHooks`; the
hooks' contract is there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.serverapp.strategy import Strategy

if TYPE_CHECKING:  # the config module imports this one
    from flwr.clientapp import ClientApp

    from fedsparse.config import Key

#: Entry-point group naming each method's :class:`Method` declaration (entry name = method name).
METHODS_GROUP = "fedsparse.methods"
#: Entry-point group naming the runtime's ClientApp factory (``client-app``): the ClientApp that
#: dispatches train messages to the methods' client steps.
RUNTIME_GROUP = "fedsparse.runtime"

StrategyBuilder = Callable[[Mapping[str, Any]], Strategy]
TrainStep = Callable[[Message, Context, Mapping[str, Any]], Message]
CrossCheck = Callable[[Mapping[str, Any]], None]


class MethodError(RuntimeError):
    """A method plug-in that cannot be loaded or is declared wrongly (a packaging error)."""


@dataclass(frozen=True)
class ErrorCase:
    """One bad input of a method, for the generated errors table (docs/errors.md).

    Either ``overrides`` (resolved on top of the defaults with ``strategy`` set to the method) or
    ``run`` (a call that raises, for inputs that are not a run configuration). ``given`` is how a
    user writes it; by default the overrides rendered as TOML.
    """

    what: str
    overrides: Mapping[str, Any] | None = None
    run: Callable[[], Any] | None = None
    given: str | None = None


@dataclass(frozen=True)
class Method:
    """Everything the core needs to know about one method; nothing about it is written elsewhere.

    ``client_step`` is ``"module:function"`` of the function answering train messages,
    ``fn(msg, context, cfg) -> reply``; it is imported only in the processes that run clients, so
    the server never imports client code. ``checks`` run only when the run's ``strategy`` is this
    method, after the core's own checks. ``keys`` are added to the configuration schema under
    ``section`` (default: the method's name). ``uses`` names the methods whose keys this one reads
    too (a combination reads its parts' keys): their keys are registered first, in their own
    sections, and a missing one is a clear error. ``plain_model_reply``: its clients reply with the
    trained model itself in ``arrays`` (not a codec or compressor payload), so testing tools such
    as ``fail-clients``' ``scale`` attack can act on it. ``codec_model_reply``: its clients receive
    the global model and reply with their trained model, both as one :mod:`fedsparse.codec`
    payload in ``arrays`` (32-bit values at the kept positions: FedDIP), which the ``scale`` attack
    decodes, scales and re-encodes with the reply's own masks. ``reply_metrics``: the keys of the
    MetricRecord its clients' train replies carry besides ``num-examples``; the reply screen rejects
    a reply with any other key or without one of them (:mod:`fedsparse.validation`). None: not
    declared — keys not every reply of the round carries are dropped instead.
    """

    name: str
    summary: str
    build: StrategyBuilder
    client_step: str
    keys: Mapping[str, Key] = field(default_factory=dict)
    section: str = ""
    checks: Sequence[CrossCheck] = ()
    error_cases: Sequence[ErrorCase] = ()
    uses: Sequence[str] = ()
    plain_model_reply: bool = False
    #: its client step honours ``client-momentum`` (``client``: keeps its buffers in
    #: ``context.state``; ``slot``: loads and returns the :data:`fedsparse.protocol.MOMENTUM_RECORD`
    #: record), through :mod:`clients.momentum`
    client_momentum: bool = False
    codec_model_reply: bool = False
    reply_metrics: tuple[str, ...] | None = None


_METHODS: dict[str, Method] | None = None
_ORIGINS: dict[str, str] = {}  # method name → the distribution that declares it
_STEPS: dict[str, TrainStep] = {}
#: The distribution of fedsparse itself (its built-in methods).
BUILTIN = "fedsparse"


def methods() -> dict[str, Method]:
    """Every installed method by name, in discovery order (built-in ones first), loaded once."""
    global _METHODS
    if _METHODS is None:
        found: dict[str, Method] = {}
        for ep in sorted(entry_points(group=METHODS_GROUP), key=_builtin_first):
            try:
                declared = ep.load()
            except Exception as err:
                raise MethodError(f"method plug-in {ep.name!r} ({ep.value}) cannot be imported: {err}") from err
            if not isinstance(declared, Method):
                raise MethodError(
                    f"entry point {ep.name!r} = {ep.value!r} is a {type(declared).__name__}, not a fedsparse.methods.Method"
                )
            if declared.name != ep.name:
                raise MethodError(
                    f"entry point {ep.name!r} declares a method named {declared.name!r}; the two must match"
                )
            if ep.name in found:
                continue  # the same distribution seen twice on sys.path (an editable install beside a wheel)
            found[ep.name] = declared
            _ORIGINS[ep.name] = _distribution(ep)
        _METHODS = found
    return _METHODS


def _distribution(ep: Any) -> str:
    dist = getattr(ep, "dist", None)  # importlib.metadata gives it; a hand-made EntryPoint may not
    return str(dist.metadata["Name"]) if dist is not None else ""


def _builtin_first(ep: Any) -> tuple[int, str]:
    """fedsparse's own methods first, then the others, each group by name."""
    return (0 if _distribution(ep) == BUILTIN else 1, ep.name)


def origin(name: str) -> str:
    """The distribution (package) that declares method ``name``."""
    methods()
    return _ORIGINS.get(name, "")


def key_declarations(distributions: Collection[str] | None = None) -> list[tuple[str, Mapping[str, Key]]]:
    """(section, keys) of every installed method — or of those the named distributions declare,
    with the methods they use — each method's ``uses`` before it, each once."""
    found = methods()
    out: list[tuple[str, Mapping[str, Key]]] = []
    done: set[str] = set()

    def add(name: str, needed_by: str | None) -> None:
        if name in done:
            return
        if name not in found:
            raise MethodError(f"method {needed_by!r} uses the keys of method {name!r}, which is not installed")
        done.add(name)
        for used in found[name].uses:
            add(used, name)
        out.append((found[name].section or name, found[name].keys))

    for name in found:
        if distributions is None or _ORIGINS.get(name) in distributions:
            add(name, None)
    return out


def strategy_names() -> list[str]:
    """Names accepted by the ``strategy`` key."""
    return list(methods())


def method(name: str) -> Method:
    """The method called ``name``; an unknown name lists what is installed."""
    found = methods()
    if name not in found:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(found)}")
    return found[name]


def build_strategy(cfg: Mapping[str, Any]) -> Strategy:
    """The configured method's Flower strategy, with the run's aggregation rule (``aggregation``,
    ``clip-norm``: :mod:`fedsparse.robust`) in place of its weighted mean, wrapped for the run
    options every method shares (``weighting = uniform``, ``client-momentum = slot``:
    :func:`fedsparse.wrappers.with_run_options`)."""
    from fedsparse.robust import AggregationRule, apply_rule
    from fedsparse.wrappers import with_run_options

    strategy = apply_rule(method(str(cfg["strategy"])).build(cfg), AggregationRule.from_config(cfg))
    return with_run_options(strategy, cfg)


def train_step(name: str) -> TrainStep:
    """The client step of method ``name`` (imported on first use, then cached)."""
    if name not in _STEPS:
        _STEPS[name] = _load_object(method(name).client_step, f"client step of method {name!r}")
    return _STEPS[name]


def client_app_factory() -> Callable[..., ClientApp]:
    """``make_client_app(run_config=None) -> ClientApp`` of the installed runtime."""
    eps = [ep for ep in entry_points(group=RUNTIME_GROUP) if ep.name == "client-app"]
    if not eps:
        raise MethodError(
            f"no 'client-app' entry point in group {RUNTIME_GROUP!r}: is fedsparse installed (pip install -e .)?"
        )
    return eps[0].load()


def _load_object(ref: str, what: str) -> Any:
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise MethodError(f"{what}: {ref!r} is not 'module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise MethodError(f"{what}: {ref!r} cannot be loaded: {err}") from err


def sampling_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """FedAvg-family sampling arguments: exactly ``clients-per-round`` of ``num-clients`` each
    round, no federated evaluation (the global model is evaluated centrally)."""
    n, k = int(cfg["num-clients"]), int(cfg["clients-per-round"])
    return {
        "fraction_train": k / n,
        "min_train_nodes": k,
        "min_available_nodes": n,
        "fraction_evaluate": 0.0,
    }


__all__ = [
    "METHODS_GROUP",
    "RUNTIME_GROUP",
    "ErrorCase",
    "Method",
    "MethodError",
    "build_strategy",
    "key_declarations",
    "client_app_factory",
    "method",
    "methods",
    "origin",
    "BUILTIN",
    "sampling_kwargs",
    "strategy_names",
    "train_step",
]
