"""What a suite asks for: the suite file's structure, its runs and their configurations.

Nothing here starts a run. Parsing only checks the file's shape (names, seeds, tables), so a typo is
reported before any configuration is resolved; :func:`resolve_runs` then checks every run's values
through :func:`fedsparse.config.resolve_config`, so a bad value fails before the first run starts.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsparse.config import Config, ConfigError, resolve_config
from fedsparse.methods import strategy_names

#: Joins method, split and seed into a run's directory name; no suite, method or split name holds it.
RUN_SEP = "--"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
SUITE_KEYS = {"name", "description", "seeds", "baseline", "base", "splits", "methods"}
#: Keys of a ``[[methods]]`` entry that are not configuration keys.
METHOD_KEYS = ("name", "splits", "seeds")


@dataclass(frozen=True)
class RunSpec:
    """One run of a suite: which method, split and seed, and its merged overrides."""

    method: str
    split: str
    seed: int
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.method}{RUN_SEP}{self.split}{RUN_SEP}s{self.seed}"


@dataclass
class Suite:
    """A parsed suite: shared keys, splits and methods (each a set of overrides), seeds.

    ``method_splits`` holds, for a method whose entry names ``splits = [...]``, the only splits it
    runs in (a study whose grid is not a full methods × splits product); other methods run in all.
    ``method_seeds`` likewise holds a method's own ``seeds = [...]``, a subset of the suite's (a study
    that repeats only some methods over several seeds, the FedLUAR δ sweep's δ = 0 and 2, say).
    """

    name: str
    description: str
    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]  # name -> overrides (insertion order kept)
    splits: dict[str, dict[str, Any]]
    seeds: list[int]
    baseline: str | None
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # --set overrides
    method_splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    method_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def runs(
        self,
        methods: Sequence[str] | None = None,
        splits: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[RunSpec]:
        """Every (split, method, seed) selected, in suite order (split-major, then method, seed)."""
        for kind, wanted, have in (("method", methods, self.methods), ("split", splits, self.splits)):
            unknown = [w for w in wanted or [] if w not in have]
            if unknown:
                raise ConfigError(f"unknown {kind} {unknown[0]!r}; this suite has: {', '.join(have)}")
        unknown_seeds = [s for s in seeds or [] if s not in self.seeds]
        if unknown_seeds:
            raise ConfigError(f"seed {unknown_seeds[0]} is not in this suite's seeds {self.seeds}")
        out = []
        for split, split_over in self.splits.items():
            if splits and split not in splits:
                continue
            for method, method_over in self.methods.items():
                if methods and method not in methods:
                    continue
                if method in self.method_splits and split not in self.method_splits[method]:
                    continue
                for seed in self.seeds:
                    if seeds and seed not in seeds:
                        continue
                    if method in self.method_seeds and seed not in self.method_seeds[method]:
                        continue
                    merged = {**self.base, **split_over, **method_over, "seed": seed, **self.extra}
                    out.append(RunSpec(method, split, seed, merged))
        return out


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a table of configuration keys, got {type(value).__name__}")
    nested = [k for k, v in value.items() if isinstance(v, (dict, list))]
    if nested:
        raise ConfigError(f"{where}: '{key}' holds non-scalar entries {nested}; allowed: flat configuration keys")
    return dict(value)


def _check_name(kind: str, name: Any, where: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or RUN_SEP in name or not name.strip("."):
        raise ConfigError(
            f"{where}: {kind} name {name!r} is not allowed; use letters, digits, '_', '.', '+' or a single '-'"
        )
    return name


def _method_splits(
    entry: Mapping[str, Any], name: str, splits: Mapping[str, Any], where: str
) -> tuple[str, ...] | None:
    """The ``splits = [...]`` of a method entry (None when absent: the method runs in every split)."""
    if "splits" not in entry:
        return None
    only = entry["splits"]
    if (
        not isinstance(only, list)
        or not only
        or not all(isinstance(s, str) and s in splits for s in only)
        or len(set(only)) != len(only)
    ):
        raise ConfigError(
            f"{where}: method {name!r}: splits = {only!r}; allowed: a non-empty list of this suite's splits "
            f"without repeats ({', '.join(splits)})"
        )
    return tuple(only)


def _method_seeds(entry: Mapping[str, Any], name: str, seeds: Sequence[int], where: str) -> tuple[int, ...] | None:
    """The ``seeds = [...]`` of a method entry (None when absent: the method runs every suite seed)."""
    if "seeds" not in entry:
        return None
    only = entry["seeds"]
    if (
        not isinstance(only, list)
        or not only
        or not all(isinstance(s, int) and not isinstance(s, bool) and s in seeds for s in only)
        or len(set(only)) != len(only)
    ):
        raise ConfigError(
            f"{where}: method {name!r}: seeds = {only!r}; allowed: a non-empty list of this suite's seeds "
            f"without repeats ({', '.join(map(str, seeds))})"
        )
    return tuple(only)


def parse_suite(data: Mapping[str, Any], *, where: str = "suite", path: Path | None = None) -> Suite:
    """Check a suite's structure (not yet its configuration values: see :func:`resolve_runs`)."""
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown top-level entries {unknown}; allowed: {', '.join(sorted(SUITE_KEYS))}")
    base = _table(data, "base", where)
    seeds = data.get("seeds", [int(base.get("seed", 0))])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise ConfigError(f"{where}: seeds = {seeds!r}; allowed: a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds = {seeds!r} repeats a seed")
    raw_splits = data.get("splits", {"default": {}})
    if not isinstance(raw_splits, dict) or not raw_splits:
        raise ConfigError(f"{where}: 'splits' must be a non-empty table of tables ([splits.NAME])")
    splits = {_check_name("split", k, where): _table(raw_splits, k, f"{where}: split {k!r}") for k in raw_splits}
    raw_methods = data.get("methods")
    if not isinstance(raw_methods, list) or not raw_methods:
        raise ConfigError(f"{where}: no methods; add [[methods]] tables with a name and a strategy")
    methods: dict[str, dict[str, Any]] = {}
    method_splits: dict[str, tuple[str, ...]] = {}
    method_seeds: dict[str, tuple[int, ...]] = {}
    for i, entry in enumerate(raw_methods):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: methods[{i}] must be a table")
        name = _check_name("method", entry.get("name"), f"{where}: methods[{i}]")
        if name in methods:
            raise ConfigError(f"{where}: method {name!r} is defined twice")
        over = {k: v for k, v in entry.items() if k not in METHOD_KEYS}
        if "strategy" not in over:
            raise ConfigError(f"{where}: method {name!r} has no 'strategy'")
        nested = [k for k, v in over.items() if isinstance(v, (dict, list))]
        if nested:
            raise ConfigError(f"{where}: method {name!r} holds non-scalar entries {nested}")
        only = _method_splits(entry, name, splits, where)
        if only is not None:
            method_splits[name] = only
        own_seeds = _method_seeds(entry, name, seeds, where)
        if own_seeds is not None:
            method_seeds[name] = own_seeds
        methods[name] = over
    baseline = data.get("baseline", "fedavg" if "fedavg" in methods else None)
    if baseline is not None and baseline not in methods:
        raise ConfigError(f"{where}: baseline {baseline!r} is not one of the methods ({', '.join(methods)})")
    # the name is a directory (DIR/<suite name>/ holds the suite's reports): a safe name without
    # "--", so it never collides with a run directory (method--split--sSEED)
    name = _check_name("suite", str(data.get("name", path.stem if path else "suite")), where)
    return Suite(
        name,
        str(data.get("description", "")),
        base,
        methods,
        splits,
        list(seeds),
        baseline,
        path,
        method_splits=method_splits,
        method_seeds=method_seeds,
    )


def load_suite(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Suite:
    """Read a suite file; ``overrides`` (``--set``) apply to every run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"suite file {str(path)!r} is not valid TOML: {err}") from err
    suite = parse_suite(data, where=f"suite {path.name}", path=path)
    suite.extra = dict(overrides or {})
    return suite


def available_methods(suite: Suite) -> tuple[list[str], list[str]]:
    """(methods whose strategy is registered, methods whose strategy is not)."""
    known = set(strategy_names())
    have = [m for m, o in suite.methods.items() if str(o["strategy"]) in known]
    return have, [m for m in suite.methods if m not in have]


def resolve_runs(runs: Sequence[RunSpec]) -> dict[str, Config]:
    """Every run's full configuration, checked before anything starts (errors name the run)."""
    out = {}
    for spec in runs:
        try:
            out[spec.name] = resolve_config(None, spec.overrides)
        except ConfigError as err:
            raise ConfigError(f"run {spec.name} (method {spec.method}, split {spec.split}): {err}") from err
    return out
