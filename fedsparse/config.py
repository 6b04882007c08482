"""Run configuration: one flat table of kebab-case keys, validated before anything starts.

The same keys work in a TOML file for ``fedsparse run``, in ``--set key=value`` overrides, in
``fedsparse.simulate({...})`` and in Flower's ``[tool.flwr.app.config]`` (``flwr run .``): the schema
below is the single source of truth, and a test keeps ``pyproject.toml`` in step with it.

Every check runs here, in the launching process, so a bad value is reported in one clear line
before Ray or Flower start (which would otherwise bury it in actor logs).
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsparse import methods

ConfigValue = bool | int | float | str
Config = dict[str, ConfigValue]


class ConfigError(ValueError):
    """A configuration value or combination that cannot run; the message says what is allowed."""


@dataclass(frozen=True)
class Key:
    """One configuration key: its default, its type and the values it accepts."""

    default: ConfigValue
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    section: str = "core"
    #: a float key that may be ±inf (NaN never is): none of the built-in keys may
    allow_infinite: bool = False
    #: a string key that also takes a number (``clip-norm = 5``), kept as its text
    number_ok: bool = False

    @property
    def kind(self) -> type:
        return type(self.default)

    def describe_allowed(self) -> str:
        if self.choices:
            return "one of: " + ", ".join(self.choices)
        lo = "" if self.minimum is None else (f"> {self.minimum}" if self.exclusive_minimum else f">= {self.minimum}")
        hi = "" if self.maximum is None else f"<= {self.maximum}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        finite = "finite " if self.kind is float and not self.allow_infinite else ""
        return f"a {finite}{self.kind.__name__}" + (f" {bounds}" if bounds else "")


def _choices(name: str) -> tuple[str, ...]:
    """Allowed names come from the registries, imported lazily to keep this module light."""
    if name == "dataset":
        from fedsparse.data import DATASETS

        return tuple(DATASETS)
    if name == "model":
        from fedsparse.models import MODEL_NAMES

        return tuple(MODEL_NAMES)
    if name == "strategy":
        return tuple(methods.strategy_names())
    raise KeyError(name)


PARTITIONS = ("iid", "dirichlet", "pathological")
WEIGHTINGS = ("examples", "uniform")
MOMENTUM_MODES = ("fresh", "client", "slot")
# the same tuples as fedsparse.model_options.INITS / WEIGHT_DECAY_RULES (kept here so that this
# module does not import torch; tests/test_run_options.py checks they agree)
INITS = ("torch", "glorot")
WEIGHT_DECAY_RULES = ("fixed", "fedluar-reference")
#: the values of ``aggregation`` (the rules are Flower's: :mod:`fedsparse.robust`)
AGGREGATIONS = ("mean", "median", "trimmed-mean", "krum", "multikrum", "bulyan")

SCHEMA: dict[str, Key] = {
    # what is learned, from what
    "dataset": Key("fashion-mnist", "dataset name"),
    "model": Key("lenet5", "model name from the registry"),
    "data-dir": Key("", "directory holding the datasets (empty: FEDSPARSE_DATA, user cache, /usr/share/datasets)"),
    # the federation
    "partition": Key("iid", "how the training set is split over clients", choices=PARTITIONS),
    "alpha": Key(0.5, "Dirichlet concentration (partition = dirichlet)", minimum=0.0, exclusive_minimum=True),
    "min-partition-size": Key(10, "smallest client for the Dirichlet split", minimum=0),
    "classes-per-client": Key(2, "classes per client (partition = pathological)", minimum=1),
    "num-clients": Key(50, "number of virtual clients (SuperNodes)", minimum=1),
    "clients-per-round": Key(5, "clients sampled each round", minimum=1),
    "rounds": Key(100, "federated rounds", minimum=1),
    # local work
    "local-epochs": Key(1, "local epochs per round (used when local-steps = 0)", minimum=0),
    "local-steps": Key(0, "local SGD steps per round; 0 = count local-epochs instead", minimum=0),
    "batch-size": Key(64, "local batch size", minimum=1),
    "lr": Key(0.01, "client learning rate", minimum=0.0, exclusive_minimum=True),
    "lr-decay": Key(
        1.0,
        "per-round multiplicative learning-rate decay (lr_t = lr * lr-decay^(t-1))",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=1.0,
    ),
    "optimizer": Key(
        "sgd",
        "client optimizer: sgd (every paper reproduced here) or adam (deep partial updating trains with Adam; "
        "its betas are torch's defaults, momentum is ignored)",
        choices=("sgd", "adam"),
    ),
    "momentum": Key(0.0, "SGD momentum", minimum=0.0, maximum=1.0),
    "weight-decay": Key(0.0, "weight decay of the client optimizer (L2, added to the gradient)", minimum=0.0),
    "weight-decay-rule": Key(
        "fixed",
        "fixed: weight-decay on every parameter; fedluar-reference: the decay the FedLUAR authors' code sets for "
        "the model (cnn: none; resnet20: Keras l2 1e-4 on kernels and the classifier bias, i.e. 2e-4 in SGD)",
        choices=WEIGHT_DECAY_RULES,
    ),
    "client-momentum": Key(
        "fresh",
        "SGD momentum across rounds: fresh (a new optimizer every round), client (each client keeps its own "
        "buffers, Flower context.state), slot (the server keeps clients-per-round buffers and hands buffer k to "
        "the k-th sampled client, as the FedLUAR reference keeps one optimizer per worker slot)",
        choices=MOMENTUM_MODES,
    ),
    "seed": Key(0, "seed for splits, sampling, initialisation and batches", minimum=0),
    "init": Key(
        "torch",
        "initialisation of the global model: torch (PyTorch's defaults) or glorot (Glorot-uniform kernels, zero "
        "biases, zero gamma on the second BatchNorm of residual blocks: Keras' defaults, the FedLUAR reference)",
        choices=INITS,
    ),
    # the method
    "strategy": Key("fedavg", "federated strategy"),
    "proximal-mu": Key(0.01, "FedProx proximal weight mu (strategy = fedprox, feddip, ...)", minimum=0.0),
    "weighting": Key(
        "examples",
        "weights of the clients' replies in every mean the server takes: examples (num-examples, FedAvg) or "
        "uniform (1/a each, FedLUAR's Algorithm 1 and reference code)",
        choices=WEIGHTINGS,
    ),
    # evaluation and resources
    "eval-every": Key(1, "evaluate the global model on the test set every N rounds (and at the last)", minimum=1),
    "eval-last": Key(
        0, "also evaluate every one of the last N rounds (a top-5-of-the-last-rounds measure needs them)", minimum=0
    ),
    "eval-batch-size": Key(1000, "batch size of the central evaluation", minimum=1),
    "client-cpus": Key(1.0, "CPUs per virtual client (Ray resources)", minimum=0.0, exclusive_minimum=True),
    "client-gpus": Key(0.0, "GPU fraction per virtual client (0 = CPU only)", minimum=0.0, maximum=1.0),
    "round-timeout": Key(600.0, "seconds to wait for replies in a round", minimum=0.0, exclusive_minimum=True),
    "max-in-flight": Key(
        "auto",
        "at most this many of a round's messages unanswered at once, the next pushed as replies come back: "
        "'auto' (on Flower's simulation engine 64, or 4 per client actor of a bigger Ray cluster; in a "
        "deployment all at once), 0 (all at once) or a count; with a window, round-timeout bounds the wait for "
        "the next reply. Why: Flower's engine checks every stored message for every node on each dispatch "
        "pass, which stalls runs with thousands of nodes (experiments/results/scale.md)",
        number_ok=True,
    ),
    "wire-bytes": Key(True, "also record the serialised (wire) size of every message"),
    "out-dir": Key("", "where results go (empty: runs/<strategy>-<dataset>-<model>-<time>)"),
    # reliability (docs/reliability.md)
    "checkpoint-every": Key(
        0,
        "write a checkpoint every N rounds and at the last (0 = never); continue with fedsparse run --resume DIR",
        minimum=0,
    ),
    "min-replies": Key(1, "a round with fewer valid replies keeps the previous model", minimum=1),
    "reply-max-abs": Key(
        1e6,
        "a reply holding a floating-point value larger than this in magnitude is rejected (0 = no bound): finite but huge values pass the finiteness check and would wreck the average or a server optimiser's moments",
        minimum=0.0,
    ),
    "fail-clients": Key(
        "",
        "testing: inject client failures, ROUND:PARTITION[:raise|timeout|nan|scale|inflate] items ('*' = any), "
        "e.g. '2:0, *:3:timeout'",
    ),
    "attack-scale": Key(
        -10.0,
        "testing: fail-clients scale replies global + attack-scale * (trained - global) (any sign; 1 = honest)",
    ),
    "max-examples": Key(
        0,
        "bound on a reply's num-examples for a node whose partition is unknown (it never answered the "
        "partition query); 0 = the largest partition of the run's split. A node with a known partition "
        "is bounded by its partition size",
        minimum=0,
    ),
    # robust aggregation (fedsparse/robust.py, docs/reliability.md)
    "aggregation": Key(
        "mean",
        "how the round's decoded updates become the new model: Flower's weighted mean, coordinate-wise median, "
        "trimmed mean, Krum, Multi-Krum or Bulyan",
        choices=AGGREGATIONS,
    ),
    "trim-beta": Key(
        0.2, "aggregation = trimmed-mean: fraction cut from each tail (Flower's FedTrimmedAvg beta)", minimum=0.0
    ),
    "num-malicious": Key(
        0,
        "aggregation = krum / multikrum / bulyan: the number f of malicious clients assumed (Flower's "
        "num_malicious_nodes); Krum needs clients-per-round >= 2f + 3, Bulyan >= 4f + 3",
        minimum=0,
    ),
    "krum-keep": Key(
        0,
        "aggregation = multikrum: updates kept and averaged (Flower's num_nodes_to_select); 0 = n - f",
        minimum=0,
    ),
    "clip-norm": Key(
        "",
        "bound on each update's L2 norm before aggregation (Flower's DP clipping): a number > 0, 'auto' "
        "(the median of the round's update norms) or '' (off)",
        number_ok=True,
    ),
}


def register_keys(section: str, keys: Mapping[str, Key]) -> None:
    """Add a method's keys to the schema. A key several methods declare (FedDIP's and SNIP's
    ``target-sparsity``) must be declared identically; it stays in the first one's section."""
    for name, key in keys.items():
        if name in SCHEMA:
            if SCHEMA[name] != Key(**{**key.__dict__, "section": SCHEMA[name].section}):
                raise RuntimeError(f"configuration key {name!r} registered twice with different definitions")
            continue
        SCHEMA[name] = Key(**{**key.__dict__, "section": section})


_METHOD_KEYS_LOADED = False


def _ensure_strategy_keys() -> None:
    """Add every installed method's keys to the schema (once; discovery imports the methods)."""
    global _METHOD_KEYS_LOADED
    if not _METHOD_KEYS_LOADED:
        for section, keys in methods.key_declarations():
            register_keys(section, keys)
        _METHOD_KEYS_LOADED = True


def defaults(distributions: Collection[str] | None = None) -> Config:
    """The default value of every key: the core's and every installed method's, or only those of
    the methods the named distributions declare (a Flower app's pyproject lists just its own)."""
    _ensure_strategy_keys()
    if distributions is None:
        return {name: key.default for name, key in SCHEMA.items()}
    wanted = {n for _, keys in methods.key_declarations(distributions) for n in keys}
    return {name: key.default for name, key in SCHEMA.items() if key.section == "core" or name in wanted}


def parse_value(text: str) -> ConfigValue:
    """Parse a ``--set`` value the way TOML would (``0.1``, ``true``, ``"x"``), else keep the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str] | None) -> Config:
    """Turn ``["lr=0.1", "strategy=fedprox"]`` into a dict, rejecting items without ``=``."""
    out: Config = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def load_toml(path: str | Path) -> Config:
    """Read a flat TOML config (a ``[tool.flwr.app.config]``-style table at top level)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with path.open("rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from err
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"config file {str(path)!r} must be a flat table of keys; found sub-tables {nested}")
    return data


def _coerce(name: str, key: Key, value: Any) -> ConfigValue:
    kind = key.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and key.choices and {"true", "false"} <= set(key.choices):
            return "true" if value else "false"  # a switch that grew a third setting keeps TOML's booleans
        if key.number_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            return repr(float(value))
    raise ConfigError(f"{name} = {value!r} has the wrong type; allowed: {key.describe_allowed()}")


def _check_range(name: str, key: Key, value: ConfigValue) -> None:
    choices = key.choices
    if choices is None and name in ("dataset", "model", "strategy"):
        choices = _choices(name)
    if choices is not None:
        if value not in choices:
            hint = difflib.get_close_matches(str(value), choices, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"unknown {name} {value!r}{extra}; choose one of: {', '.join(choices)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value) and not (math.isinf(value) and key.allow_infinite):
        # NaN compares False with every bound, so it would pass the range checks below
        raise ConfigError(f"{name} = {value!r} is not a finite number; allowed: {key.describe_allowed()}")
    if key.minimum is not None:
        bad = value <= key.minimum if key.exclusive_minimum else value < key.minimum
        if bad:
            raise ConfigError(f"{name} = {value!r} is out of range; allowed: {key.describe_allowed()}")
    if key.maximum is not None and value > key.maximum:
        raise ConfigError(f"{name} = {value!r} is out of range; allowed: {key.describe_allowed()}")


CrossCheck = Callable[[Config], None]
_CROSS_CHECKS: list[CrossCheck] = []


def cross_check(fn: CrossCheck) -> CrossCheck:
    """Register a core check that looks at several keys together (a method declares its own in
    its :class:`fedsparse.methods.Method`; they run after these, for that method only)."""
    _CROSS_CHECKS.append(fn)
    return fn


@cross_check
def _check_federation(cfg: Config) -> None:
    if int(cfg["clients-per-round"]) > int(cfg["num-clients"]):
        raise ConfigError(
            f"clients-per-round = {cfg['clients-per-round']} exceeds num-clients = {cfg['num-clients']}; "
            "allowed: 1 .. num-clients"
        )
    if cfg["local-steps"] == 0 and cfg["local-epochs"] == 0:
        raise ConfigError("local-epochs = 0 and local-steps = 0 leave clients no work; set one of them > 0")


@cross_check
def _check_reliability(cfg: Config) -> None:
    if int(cfg["min-replies"]) > int(cfg["clients-per-round"]):
        raise ConfigError(
            f"min-replies = {cfg['min-replies']} exceeds clients-per-round = {cfg['clients-per-round']}: no round "
            "could aggregate; allowed: 1 .. clients-per-round"
        )
    from fedsparse.failures import parse_fail_clients, scale_strategies

    for rule in parse_fail_clients(str(cfg["fail-clients"])):
        if rule.partition >= int(cfg["num-clients"]):
            raise ConfigError(
                f"fail-clients names partition {rule.partition}, but num-clients = {cfg['num-clients']}; "
                f"allowed: 0 .. {int(cfg['num-clients']) - 1} or '*'"
            )
        if rule.server_round > int(cfg["rounds"]):
            raise ConfigError(
                f"fail-clients names round {rule.server_round}, but rounds = {cfg['rounds']}; "
                f"allowed: 1 .. {cfg['rounds']} or '*'"
            )
        if rule.mode == "scale" and str(cfg["strategy"]) not in scale_strategies():
            raise ConfigError(
                f"fail-clients mode 'scale' is not supported by strategy {cfg['strategy']!r}: its reply is not a "
                f"plain model (nor a FedDIP codec model); allowed strategies: {', '.join(scale_strategies())}"
            )


def client_momentum(cfg: Mapping[str, Any]) -> str:
    """The effective ``client-momentum`` mode. ``persist-momentum = true`` (FedLUAR's older key,
    kept so that existing configs and checkpoints still run) is an alias of ``"client"``."""
    mode = str(cfg.get("client-momentum", "fresh"))
    if mode == "fresh" and bool(cfg.get("persist-momentum", False)):
        return "client"
    return mode


@cross_check
def _check_client_momentum(cfg: Config) -> None:
    mode, alias = str(cfg["client-momentum"]), bool(cfg.get("persist-momentum", False))
    if alias and mode not in ("fresh", "client"):
        raise ConfigError(
            f"persist-momentum = true (an alias of client-momentum = 'client') contradicts client-momentum = {mode!r}; "
            "set persist-momentum = false"
        )
    effective = client_momentum(cfg)
    if effective == "fresh":
        return
    given = "persist-momentum = true" if alias and mode == "fresh" else f"client-momentum = {effective!r}"
    if not methods.method(str(cfg["strategy"])).client_momentum:
        able = [name for name, m in methods.methods().items() if m.client_momentum]
        raise ConfigError(
            f"{given} is not supported by strategy {cfg['strategy']!r} (its client step starts a fresh optimizer "
            f"every round); allowed: client-momentum = 'fresh', or one of the strategies {', '.join(able)}"
        )
    if str(cfg.get("optimizer", "sgd")) != "sgd":
        off = "persist-momentum = false" if given.startswith("persist") else "client-momentum = 'fresh'"
        raise ConfigError(
            f"{given} with optimizer = {cfg['optimizer']!r}: only SGD's momentum buffers are kept; "
            f"set optimizer = 'sgd' or {off}"
        )
    if float(cfg["momentum"]) == 0.0:
        raise ConfigError(f"{given} but momentum = 0.0: there is no momentum to keep; set momentum > 0 (paper: 0.9)")


@cross_check
def _check_weight_decay_rule(cfg: Config) -> None:
    if cfg["weight-decay-rule"] == "fixed":
        return
    if float(cfg["weight-decay"]) != 0.0:
        raise ConfigError(
            f"weight-decay = {cfg['weight-decay']!r} with weight-decay-rule = {cfg['weight-decay-rule']!r}: the rule "
            "sets the decay per model; allowed: weight-decay = 0, or weight-decay-rule = 'fixed'"
        )
    from fedsparse.model_options import reference_decay

    try:
        reference_decay(str(cfg["model"]))
    except ValueError as err:
        raise ConfigError(str(err)) from err


@cross_check
def _check_max_in_flight(cfg: Config) -> None:
    from fedsparse.grid import parse_max_in_flight

    try:
        parse_max_in_flight(cfg["max-in-flight"])
    except ValueError as err:
        raise ConfigError(str(err)) from None


@cross_check
def _check_aggregation(cfg: Config) -> None:
    from fedsparse.robust import min_replies_for, parse_clip_norm

    try:
        parse_clip_norm(str(cfg["clip-norm"]))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not float(cfg["trim-beta"]) < 0.5:
        raise ConfigError(f"trim-beta = {cfg['trim-beta']!r} is out of range; allowed: 0 <= trim-beta < 0.5")
    rule, f, n = str(cfg["aggregation"]), int(cfg["num-malicious"]), int(cfg["clients-per-round"])
    need = min_replies_for(rule, f)
    if n < need:
        bound = "4f + 3" if rule == "bulyan" else "2f + 3"
        raise ConfigError(
            f"aggregation = {rule!r} with num-malicious = {f} needs at least {bound} = {need} updates a round, but "
            f"clients-per-round = {n}; allowed: clients-per-round >= {need}, or a smaller num-malicious"
        )
    keep = int(cfg["krum-keep"])
    if rule == "multikrum" and keep > n:
        raise ConfigError(f"krum-keep = {keep} exceeds clients-per-round = {n}; allowed: 0 (n - f) .. {n}")


def _check_rule_supported(cfg: Config) -> None:
    """A non-default aggregation rule only for methods that can take it: building the strategy
    applies the rule, and a strategy that cannot decode its replies refuses it (ConfigError)."""
    if str(cfg["aggregation"]) == "mean" and not str(cfg["clip-norm"]).strip():
        return
    methods.build_strategy(cfg)


@cross_check
def _check_dataset_fits(cfg: Config) -> None:
    import torch

    from fedsparse.data.info import dataset_info
    from fedsparse.models import build_model

    info = dataset_info(str(cfg["dataset"]))
    if cfg["partition"] == "pathological" and not 1 <= int(cfg["classes-per-client"]) <= info.num_classes:
        raise ConfigError(
            f"classes-per-client = {cfg['classes-per-client']} is out of range for {cfg['dataset']}; "
            f"allowed: 1 .. {info.num_classes}"
        )
    try:  # on the meta device: checks the shapes without allocating the weights
        with torch.device("meta"):
            build_model(str(cfg["model"]), info.num_classes, info.in_channels, info.image_size)
    except ValueError as err:
        raise ConfigError(f"model {cfg['model']!r} cannot take {cfg['dataset']} inputs: {err}") from err


def resolve_config(
    base: Mapping[str, Any] | str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Merge defaults, a file or mapping, and overrides; check every key and value.

    Raises :class:`ConfigError` naming the bad key or value and what is allowed.
    """
    _ensure_strategy_keys()
    given: dict[str, Any] = {}
    if isinstance(base, (str, Path)):
        given.update(load_toml(base))
    elif base is not None:
        given.update(base)
    given.update(overrides or {})
    cfg = defaults()
    for name, value in given.items():
        if name not in SCHEMA:
            hint = difflib.get_close_matches(name, SCHEMA, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"unknown configuration key {name!r}{extra}; allowed keys: {', '.join(sorted(SCHEMA))}")
        cfg[name] = _coerce(name, SCHEMA[name], value)
    for name, value in cfg.items():
        _check_range(name, SCHEMA[name], value)
    for check in (*_CROSS_CHECKS, *methods.method(str(cfg["strategy"])).checks):
        check(cfg)
    _check_rule_supported(cfg)
    return cfg


def round_lr(cfg: Mapping[str, Any], server_round: int) -> float:
    """Learning rate of round t (1-based): lr · lr-decay^(t−1), as in FedDIP's authors' code."""
    return float(cfg["lr"]) * float(cfg["lr-decay"]) ** (server_round - 1)


def to_toml(cfg: Mapping[str, Any]) -> str:
    """Render a resolved config as TOML (written next to the results)."""
    import tomli_w

    return tomli_w.dumps(dict(cfg))
