"""FedLUAR (Kim, Kang & Lee, 2025): layer-wise update aggregation with recycling, as a wrapper
around any Flower aggregation strategy.

Each round t the server sends the clients the model x_t and the set R_t of recycled layers; the
clients train every layer but leave the arrays of R_t out of their replies. The server lets the
wrapped ("base") strategy aggregate the arrays it did receive exactly as it always would, which gives
the update Δ_t,l = base(x_t)_l − x_t,l of every layer not in R_t; the layers in R_t instead move by
the update applied to them last time, Δ̂_{t−1,l}. Then it scores the fresh layers,
s_l = ‖Δ_t,l‖ / (‖x_t,l‖ + ε) (recycled layers keep their stale score), and draws R_{t+1}: δ layers
without replacement with p_l ∝ 1/s_l from a seeded generator (paper Algorithms 1–2, eqs. 1–5).
R_1 is empty.

How the base rule stays exact (design):

* the base strategy aggregates the replies as they arrive — all of them without R_t — so for the
  layers it receives it computes exactly what it computes without LUAR;
* strategies that keep per-array state (FedOpt's ``current_arrays``/``m_t``/``v_t``, FedAvgM's
  ``current_arrays``/``momentum_vector``) see that state restricted to the received layers for the
  duration of ``aggregate_train``; afterwards the entries of the recycled layers are put back
  untouched, so a recycled layer neither pollutes nor decays the server optimiser's moments (it had
  no new observation this round);
* with δ = 0 nothing is restricted, no config entry is added and the base's output is returned
  as it is: the wrapper is then bit-for-bit the wrapped strategy.

``LUAR`` is a plain ``flwr.serverapp.strategy.Strategy``: it runs in ``Strategy.start`` in any Flower
deployment whose ClientApp omits the arrays named in the round's config (``clients.fedluar``), and
it still works — just without the savings — with clients that send everything.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

from fedsparse.checkpoint import atomic_write
from fedsparse.config import ConfigError, Key, resolve_config
from fedsparse.data.info import dataset_info
from fedsparse.hooks import MethodHooks
from fedsparse.layer_sampling import layer_scores, sample_recycled_layers
from fedsparse.methods import ErrorCase, Method, sampling_kwargs
from fedsparse.models import build_model
from fedsparse.protocol import STANDARD_REPLY_METRICS, single_array_record
from fedsparse.protocol.fedluar import RECYCLED_CONFIG_KEY, luar_round_lr, parse_milestones
from fedsparse.robust import AggregationRule, apply_rule
from fedsparse.validation import check_arrays

log = logging.getLogger("fedsparse")

#: Base strategies LUAR can wrap from a run configuration (any Strategy works in code).
BASES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")
GRANULARITIES = ("tensor", "module")
#: Attributes of Flower's strategies that hold per-array state (FedOpt family, FedAvgM).
PER_ARRAY_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector")

#: FedLUAR's configuration keys (the LUAR combinations declare the ones they use, identically).
KEYS: dict[str, Key] = {
    "recycled-layers": Key(2, "FedLUAR δ: layers whose previous update the server recycles each round", minimum=0),
    "luar-base": Key("fedavg", "aggregation rule LUAR wraps", choices=BASES),
    "luar-granularity": Key(
        "tensor",
        "what one recyclable layer is: every weight tensor with ndim > 1 (paper) or a module "
        "(its weight tensor together with its bias)",
        choices=GRANULARITIES,
    ),
    "persist-momentum": Key(
        False,
        "older alias of client-momentum = 'client' (each client keeps its own SGD momentum buffers in Flower "
        "context state); kept so that existing configs and checkpoints run. The reference's behaviour is "
        "client-momentum = 'slot'",
    ),
    "luar-lr-milestones": Key(
        "", "FedLUAR clients: comma-separated rounds after which lr is multiplied by luar-lr-gamma (paper: 100,150)"
    ),
    "luar-lr-gamma": Key(
        0.1, "FedLUAR clients: learning-rate factor at each milestone", minimum=0.0, exclusive_minimum=True
    ),
    "luar-server-lr": Key(
        0.0,
        "server learning rate of fedadam / fedyogi / fedavgm under LUAR; 0 = Flower's default "
        "(0.1 for FedAdam and FedYogi, 1.0 for FedAvgM)",
        minimum=0.0,
    ),
    "luar-server-momentum": Key(0.0, "FedAvgM server momentum (luar-base = fedavgm)", minimum=0.0, maximum=1.0),
    "luar-beta1": Key(0.9, "FedAdam / FedYogi first-moment decay", minimum=0.0, maximum=1.0),
    "luar-beta2": Key(0.99, "FedAdam / FedYogi second-moment decay", minimum=0.0, maximum=1.0),
    "luar-tau": Key(1e-3, "FedAdam / FedYogi adaptivity τ", minimum=0.0, exclusive_minimum=True),
}


def recyclable_groups(
    named_shapes: Iterable[tuple[str, Sequence[int]]], granularity: str = "tensor"
) -> dict[str, list[str]]:
    """Recyclable layers of a model and the array names each one covers.

    ``named_shapes``: (name, shape) of the model's *trainable parameters* (buffers excluded).
    ``tensor``: every parameter with ndim > 1 is one layer (the paper; ResNet-20 → 23 layers).
    ``module``: the parameters sharing a module prefix form one layer, if the module owns a
    parameter with ndim > 1 (a conv/linear with its bias); normalisation modules stay aggregated.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of: {', '.join(GRANULARITIES)}")
    items = [(str(n), tuple(int(d) for d in s)) for n, s in named_shapes]
    if granularity == "tensor":
        return {n: [n] for n, s in items if len(s) > 1}
    modules: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in items:
        modules.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append((name, shape))
    return {m: [n for n, _ in members] for m, members in modules.items() if any(len(s) > 1 for _, s in members)}


# --------------------------------------------------------------------------------------------
# per-array state of the base strategy: restrict to the received layers, merge back afterwards
# --------------------------------------------------------------------------------------------


def _restrict(value: Any, keys: Sequence[str], drop: set[str]) -> Any:
    if isinstance(value, ArrayRecord):
        return ArrayRecord({k: v for k, v in value.items() if k not in drop})
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in drop}
    if isinstance(value, list) and len(value) == len(keys):
        return [v for k, v in zip(keys, value) if k not in drop]
    raise AggregationError(
        f"cannot restrict the base strategy's per-array state of type {type(value).__name__} "
        f"(expected a dict or ArrayRecord keyed by array name, or a list in array order)"
    )


def _merge(old: Any, new: Any, keys: Sequence[str], drop: set[str], zeros: Mapping[str, np.ndarray]) -> Any:
    """Entries of ``new`` for the received layers, ``old`` (or zeros) for the recycled ones."""
    if isinstance(new, dict):

        def pick(k: str) -> Any:
            if k in new:
                return new[k]
            if isinstance(old, dict) and k in old:
                return old[k]
            return np.zeros_like(zeros[k])

        return {k: pick(k) for k in keys if k in new or k in drop}
    if isinstance(new, list):
        kept = iter(new)
        return [
            (old[i] if isinstance(old, list) else np.zeros_like(zeros[k])) if k in drop else next(kept)
            for i, k in enumerate(keys)
        ]
    raise AggregationError(f"cannot merge base-strategy state of type {type(new).__name__}")


class LUAR(Strategy, MethodHooks):
    """Layer-wise update aggregation with recycling around a Flower strategy ``base``.

    Parameters
    ----------
    base : the aggregation rule for the layers that are received (FedAvg, FedProx, FedAdam, ...).
    num_recycled : δ, how many layers are recycled from round 2 on.
    layers : the recyclable layers: None (every floating array with ndim > 1, known at the first
        round), a sequence of array names (one layer each), or a mapping layer → array names
        (module-level grouping). Arrays in no layer are always aggregated.
    seed : seeds the generator that draws R_t.
    eps : ε of the score's denominator and of the zero-score guard.
    config_key : the config entry that names the arrays clients leave out.
    client_lr : optional ``round -> lr`` used only to report the clients' learning rate in
        ``round_report`` (when the clients follow a schedule the loop does not know, e.g. milestones).

    A base that has fedsparse's hooks (:class:`fedsparse.hooks.MethodHooks`: FedDIP, the uplink
    compressors) is composed, not changed: it screens the replies (it decodes its own payloads and
    honours the omitted arrays), its round and final reports are merged into LUAR's, its state is
    checkpointed with LUAR's, and every model LUAR returns goes through its
    :meth:`~fedsparse.hooks.MethodHooks.constrain` (FedDIP: a recycled layer moved by its previous
    update stays inside the current mask).
    """

    def __init__(
        self,
        base: Strategy,
        num_recycled: int,
        *,
        layers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        seed: int = 0,
        eps: float = 1e-12,
        config_key: str = RECYCLED_CONFIG_KEY,
        client_lr: Any = None,
    ) -> None:
        if isinstance(num_recycled, bool) or int(num_recycled) != num_recycled or num_recycled < 0:
            raise ValueError(f"num_recycled (δ) must be an integer >= 0; got {num_recycled!r}")
        if not isinstance(base, Strategy):
            raise TypeError(f"base must be a flwr.serverapp.strategy.Strategy; got {type(base).__name__}")
        self.base = base
        self.num_recycled = int(num_recycled)
        self.eps = float(eps)
        self.config_key = config_key
        self.seed = int(seed)
        self.client_lr = client_lr
        self.rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x1A4]))
        self.groups: dict[str, list[str]] | None = None
        if layers is not None:
            self.groups = (
                {str(g): [str(k) for k in ks] for g, ks in layers.items()}
                if isinstance(layers, Mapping)
                else {str(n): [str(n)] for n in layers}
            )
        # state that lives across rounds
        self.prev_update: dict[str, np.ndarray] = {}  # Δ̂_{t−1} per array of every recyclable layer
        self.scores: dict[str, float] = {}  # s_l, stale for recycled layers
        self.next_recycled: list[str] = []  # R_{t+1}, drawn at the end of round t
        self.aggregated_count: dict[str, int] = {}
        self.recycled_count: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []  # one entry per round: recycled layers and scores
        # state of the round in flight
        self._keys: list[str] = []
        self._x: dict[str, np.ndarray] = {}
        self._round: int | None = None
        self._recycled: list[str] = []  # R_t (layer names)
        self._warned_full_replies = False
        self._ready = False
        self.reply_spec: dict[str, tuple[tuple[int, ...], str]] = {}

    # ---- layers ---------------------------------------------------------------------------------
    def _setup_layers(self, arrays: ArrayRecord) -> None:
        if self.groups is None:
            self.groups = {}
            for key, arr in arrays.items():
                if len(arr.shape) > 1 and np.issubdtype(np.dtype(arr.dtype), np.floating):
                    self.groups[key] = [key]
        missing = sorted({k for ks in self.groups.values() for k in ks} - set(arrays.keys()))
        if missing:
            raise ValueError(f"recyclable layers name arrays the model does not have: {', '.join(missing)}")
        if self.num_recycled > len(self.groups):
            raise ValueError(
                f"δ = {self.num_recycled} exceeds the {len(self.groups)} recyclable layers of this model "
                f"({', '.join(self.groups)}); allowed: 0 .. {len(self.groups)}"
            )
        for g in self.groups:
            self.aggregated_count.setdefault(g, 0)
            self.recycled_count.setdefault(g, 0)
        # What a reply may carry: the clients' arrays as in round 1 (a server optimiser such as
        # Flower's FedAdam may turn the *global* arrays into float64; clients still send float32).
        self.reply_spec = {k: (tuple(int(d) for d in a.shape), np.dtype(str(a.dtype)).str) for k, a in arrays.items()}

    def recycled_arrays(self, layers: Iterable[str]) -> list[str]:
        """Array names covered by ``layers``, in model order."""
        assert self.groups is not None
        wanted = {k for g in layers for k in self.groups[g]}
        return [k for k in self._keys if k in wanted]

    # ---- Strategy interface ---------------------------------------------------------------------
    def use_aggregation(self, rule: AggregationRule) -> LUAR:
        """The base's rule on the received layers becomes ``rule`` (:mod:`fedsparse.robust`): a base with
        fedsparse's hooks takes it on its decoded payloads, a Flower FedAvg-family base combines the
        replies' models with it first; recycled layers still move by their previous update."""
        self.base = apply_rule(self.base, rule)
        return self

    def summary(self) -> None:
        log.info("FedLUAR: δ = %d recycled layers over %s", self.num_recycled, type(self.base).__name__)
        self.base.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The base's train messages, with R_t (array names to omit) in the round's config."""
        self._keys = list(arrays.keys())
        if not self._ready:
            self._setup_layers(arrays)
            self._ready = True
        self._x = {k: np.array(a.numpy(), copy=True) for k, a in arrays.items()}
        self._round = server_round
        self._recycled = list(self.next_recycled)
        # `Strategy.start` passes one config object every round: never write into the caller's.
        round_config = ConfigRecord(dict(config.items()))
        if self._recycled:
            round_config[self.config_key] = self.recycled_arrays(self._recycled)
        return self.base.configure_train(server_round, arrays, round_config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Base rule on the received layers, previous update on the recycled ones; draw R_{t+1};
        the result kept within the base's constraints."""
        new, metrics = self._aggregate(server_round, replies)
        if new is not None and isinstance(self.base, MethodHooks):
            new = self.base.constrain(new)
        return new, metrics

    def _aggregate(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._round is None or not self._x:
            raise AggregationError("LUAR.aggregate_train before configure_train: the round's model x_t is unknown")
        replies = list(replies)
        if not replies:
            # Nothing received (or fewer than min-replies): no layer is recycled and LUAR's state
            # stays as it is. The base still sees the round end, so a base that changes the model
            # on its own (FedDIP's pruning schedule on a reconfiguration round) behaves as alone.
            return self.base.aggregate_train(server_round, [])
        omit = set(self.recycled_arrays(self._recycled))
        replies = [self._without(m, omit) for m in replies] if omit else replies
        with self._base_state_restricted(omit) as merge:
            out, metrics = self.base.aggregate_train(server_round, replies)
            if out is None:  # nothing received: the model and LUAR's state stay as they are
                return None, metrics
            missing = [k for k in self._keys if k not in omit and k not in out]
            if missing:
                raise AggregationError(f"the base strategy returned no update for {', '.join(missing)}")
            if omit:
                new = ArrayRecord(
                    {
                        k: Array(np.asarray(self._x[k] + self.prev_update[k])) if k in omit else out[k]
                        for k in self._keys
                    }
                )
            else:
                new = out
            merge(new)
        self._after_round(server_round, new, omit)
        return new, metrics

    def validate_reply(self, server_round: int, msg: Message) -> str | None:
        """Content check for fedsparse's reply screen. A base with hooks checks its own payloads;
        otherwise: one ArrayRecord with the model's arrays minus R_t (or the whole model, from a
        client that ignores R_t), shapes and dtypes of the clients' model, finite. None = accept,
        else the reason to reject."""
        if isinstance(self.base, MethodHooks):
            return self.base.validate_reply(server_round, msg)
        record = single_array_record(
            msg, getattr(self.base, "arrayrecord_key", "arrays")
        )  # Flower's FedAvg family names it
        if isinstance(record, str):
            return record
        omit = self.recycled_arrays(self._recycled) if server_round == self._round else []
        if omit and set(record.keys()) == set(self.reply_spec):
            return check_arrays(record, self.reply_spec)  # a full model: accepted, recycled part ignored
        return check_arrays(record, self.reply_spec, omit=omit)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.base.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.base.aggregate_evaluate(server_round, replies)

    # ---- the LUAR step --------------------------------------------------------------------------
    def _without(self, msg: Message, omit: set[str]) -> Message:
        """A reply that still carries recycled arrays (a client that ignores R_t), without them."""
        if msg.has_error():
            return msg
        records = msg.content.array_records
        if not any(k in omit for rec in records.values() for k in rec.keys()):
            return msg
        if not self._warned_full_replies:
            log.warning("FedLUAR: a client sent arrays the server recycles this round; they are ignored")
            self._warned_full_replies = True
        content = RecordDict()
        for name, rec in msg.content.items():
            content[name] = ArrayRecord({k: v for k, v in rec.items() if k not in omit}) if name in records else rec
        clone = copy.copy(msg)
        clone.content = content
        return clone

    @contextlib.contextmanager
    def _base_state_restricted(self, omit: set[str]) -> Iterator[Any]:
        """Show the base strategy only the received layers' state; merge back via the yielded fn."""
        if not omit:
            yield lambda new: None
            return
        keys, base = self._keys, self.base
        prior = {n: getattr(base, n) for n in PER_ARRAY_STATE if hasattr(base, n)}
        restricted = {n: _restrict(v, keys, omit) for n, v in prior.items() if v is not None}
        for name, value in restricted.items():
            setattr(base, name, value)
        merged = False

        def merge(new_global: ArrayRecord) -> None:
            nonlocal merged
            for name, old in prior.items():
                now = getattr(base, name)
                if now is None:
                    continue
                if name == "current_arrays":
                    # FedOpt resets it every configure_train (put the full x_t back); FedAvgM keeps
                    # it as "the global model" when it replaced it, which is now `new_global`.
                    replaced = now is not restricted.get(name)
                    setattr(base, name, new_global if replaced and isinstance(now, ArrayRecord) else old)
                else:
                    setattr(base, name, _merge(old, now, keys, omit, self._x))
            merged = True

        try:
            yield merge
        finally:
            if not merged:  # no output or an error: leave the base exactly as it was
                for name, old in prior.items():
                    setattr(base, name, old)

    def _after_round(self, server_round: int, new: ArrayRecord, omit: set[str]) -> None:
        assert self.groups is not None
        recycled = set(self._recycled)
        fresh = [g for g in self.groups if g not in recycled]
        deltas: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        for g in fresh:
            parts_d, parts_x = [], []
            for k in self.groups[g]:
                delta = np.asarray(new[k].numpy()) - self._x[k]
                self.prev_update[k] = delta
                parts_d.append(torch.from_numpy(np.ascontiguousarray(delta)).reshape(-1))
                parts_x.append(torch.from_numpy(self._x[k]).reshape(-1))
            deltas[g] = parts_d[0] if len(parts_d) == 1 else torch.cat([p.to(torch.float64) for p in parts_d])
            weights[g] = parts_x[0] if len(parts_x) == 1 else torch.cat([p.to(torch.float64) for p in parts_x])
        fresh_scores = layer_scores(deltas, weights, eps=self.eps) if fresh else {}
        self.scores = {g: fresh_scores.get(g, self.scores.get(g, math.nan)) for g in self.groups}
        for g in self.groups:
            if g in recycled:
                self.recycled_count[g] += 1
            else:
                self.aggregated_count[g] += 1
        self.history.append(
            {
                "round": server_round,
                "recycled": sorted(recycled, key=list(self.groups).index),
                "scores": dict(self.scores),
            }
        )
        if self.num_recycled and all(not math.isnan(s) for s in self.scores.values()):
            self.next_recycled = sample_recycled_layers(self.scores, self.num_recycled, self.rng, eps=self.eps)
        else:
            self.next_recycled = []
        self._x = {}

    # ---- reports --------------------------------------------------------------------------------
    def round_report(self, server_round: int) -> dict[str, Any]:
        """rounds.csv columns: the layers recycled in this round (';'-joined) and how many."""
        entry = next((h for h in reversed(self.history) if h["round"] == server_round), None)
        if entry is not None:
            recycled = entry["recycled"]
        else:  # nothing was aggregated this round: report what the clients were told to omit
            recycled = list(self._recycled) if server_round == self._round else []
        row: dict[str, Any] = {"recycled_layers": ";".join(recycled), "num_recycled": len(recycled)}
        if self.client_lr is not None:
            row["lr"] = float(self.client_lr(server_round))
        if isinstance(self.base, MethodHooks):
            return {**self.base.round_report(server_round), **row}
        return row

    def layer_table(self) -> list[dict[str, Any]]:
        """Per layer: parameters, rounds aggregated, rounds recycled (the paper's Figure 3)."""
        assert self.groups is not None
        rows = []
        for g, ks in self.groups.items():
            params = int(sum(int(np.prod(self._shape(k))) for k in ks))
            a, r = self.aggregated_count.get(g, 0), self.recycled_count.get(g, 0)
            rows.append(
                {
                    "layer": g,
                    "arrays": ";".join(ks),
                    "params": params,
                    "aggregated": a,
                    "recycled": r,
                    "aggregated_fraction": a / (a + r) if a + r else math.nan,
                }
            )
        return rows

    def _shape(self, key: str) -> tuple[int, ...]:
        if key in self.prev_update:
            return tuple(self.prev_update[key].shape)
        return tuple(self._x[key].shape) if key in self._x else (0,)

    def final_report(self, out_dir: Path) -> dict[str, Any]:
        """luar_layers.csv + luar_layers.png (aggregated vs recycled per layer), luar_scores.csv;
        the base's own final report (a base with hooks) merged in."""
        base = (self.base.final_report(out_dir) if isinstance(self.base, MethodHooks) else None) or {}
        return {**base, **self._own_final_report(out_dir)}

    def _own_final_report(self, out_dir: Path) -> dict[str, Any]:
        out_dir = Path(out_dir)
        table = pd.DataFrame(self.layer_table())
        atomic_write(out_dir / "luar_layers.csv", table.to_csv(index=False))
        scores = pd.DataFrame(
            [
                {"round": h["round"], "layer": g, "score": s, "recycled": g in h["recycled"]}
                for h in self.history
                for g, s in h["scores"].items()
            ]
        )
        atomic_write(out_dir / "luar_scores.csv", scores.to_csv(index=False))
        plot_layer_counts(
            table, out_dir / "luar_layers.png", title=f"FedLUAR δ={self.num_recycled} over {type(self.base).__name__}"
        )
        return {
            "luar_recycled_layers": self.num_recycled,
            "luar_base": type(self.base).__name__,
            "luar_layers": {
                r["layer"]: {"aggregated": r["aggregated"], "recycled": r["recycled"]} for r in table.to_dict("records")
            },
        }

    # ---- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue a run between rounds (numpy arrays and JSON-able values).

        The base strategy's state: its own ``state_dict()`` when it has one (``base_state``; e.g.
        FedDIP's masks and schedule position under feddip-luar, a compressor's settings under
        fedluar-paq), otherwise — Flower's own strategies — its per-array attributes (``base``:
        FedOpt's ``current_arrays`` / ``m_t`` / ``v_t``, FedAvgM's ``current_arrays`` /
        ``momentum_vector``).
        """
        hooks = self.base if isinstance(self.base, MethodHooks) else None
        base_state: dict[str, Any] = {}
        for name in () if hooks is not None else PER_ARRAY_STATE:
            value = getattr(self.base, name, None)
            if isinstance(value, ArrayRecord):
                base_state[name] = {"type": "ArrayRecord", "value": {k: np.array(a.numpy()) for k, a in value.items()}}
            elif isinstance(value, dict):
                base_state[name] = {"type": "dict", "value": {k: np.array(v) for k, v in value.items()}}
            elif isinstance(value, list):
                base_state[name] = {"type": "list", "value": [np.array(v) for v in value]}
        return {
            "num_recycled": self.num_recycled,
            "groups": {g: list(ks) for g, ks in (self.groups or {}).items()},
            "keys": list(self._keys),
            "reply_spec": {k: [list(shape), dtype] for k, (shape, dtype) in self.reply_spec.items()},
            "prev_update": {k: v.copy() for k, v in self.prev_update.items()},
            "scores": dict(self.scores),
            "next_recycled": list(self.next_recycled),
            "aggregated_count": dict(self.aggregated_count),
            "recycled_count": dict(self.recycled_count),
            "history": copy.deepcopy(self.history),
            "rng_state": copy.deepcopy(self.rng.bit_generator.state),
            "base": base_state,
            **({"base_state": hooks.state_dict()} if hooks is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_recycled"]) != self.num_recycled:
            raise ValueError(f"checkpoint has δ = {state['num_recycled']}, this strategy δ = {self.num_recycled}")
        self.groups = {g: list(ks) for g, ks in state["groups"].items()} or self.groups
        self._keys = list(state["keys"])
        self.reply_spec = {
            k: (tuple(int(d) for d in shape), str(dtype)) for k, (shape, dtype) in state["reply_spec"].items()
        }
        self._ready = bool(self._keys) and self.groups is not None
        self.prev_update = {k: np.array(v) for k, v in state["prev_update"].items()}
        self.scores = dict(state["scores"])
        self.next_recycled = list(state["next_recycled"])
        self.aggregated_count = dict(state["aggregated_count"])
        self.recycled_count = dict(state["recycled_count"])
        self.history = copy.deepcopy(list(state["history"]))
        self.rng.bit_generator.state = copy.deepcopy(state["rng_state"])
        hooks = self.base if isinstance(self.base, MethodHooks) else None
        if "base_state" in state:
            if hooks is None:
                raise ValueError(
                    f"the saved LUAR state holds a state_dict() of its base strategy, but {type(self.base).__name__} "
                    "has no load_state_dict()"
                )
            hooks.load_state_dict(state["base_state"])
        elif hooks is not None:
            raise ValueError(
                f"the saved LUAR state holds no state of its base strategy {type(self.base).__name__} (saved by an "
                "older fedsparse, whose LUAR dropped it); it cannot be resumed exactly: start a new run"
            )
        for name, item in state.get("base", {}).items():
            value = item["value"]
            if item["type"] == "ArrayRecord":
                setattr(self.base, name, ArrayRecord({k: Array(np.array(v)) for k, v in value.items()}))
            elif item["type"] == "dict":
                setattr(self.base, name, {k: np.array(v) for k, v in value.items()})
            else:
                setattr(self.base, name, [np.array(v) for v in value])


def plot_layer_counts(table: Any, path: Path, title: str = "FedLUAR") -> Path:
    """Bar plot per layer: rounds aggregated by LUAR vs by FedAvg (every round), as in Figure 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(table)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * n + 2), 3.8))
    x = np.arange(n)
    total = (table["aggregated"] + table["recycled"]).to_numpy()
    ax.bar(x - 0.2, total, width=0.4, label="FedAvg (every round)", color="#bbbbbb")
    ax.bar(x + 0.2, table["aggregated"].to_numpy(), width=0.4, label="FedLUAR (aggregated)", color="#1f77b4")
    ax.set_xticks(x)
    ax.set_xticklabels(table["layer"], rotation=60 if n > 6 else 20, ha="right", fontsize=8)
    ax.set_ylabel("number of aggregations")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(1, int(total.max()) if n else 1) * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


def model_layers(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """The recyclable layers of the configured model (built on the meta device: no weights)."""
    info = dataset_info(str(cfg["dataset"]))
    with torch.device("meta"):
        model = build_model(str(cfg["model"]), info.num_classes, info.in_channels, info.image_size)
    return recyclable_groups(((n, p.shape) for n, p in model.named_parameters()), str(cfg["luar-granularity"]))


def build_base(cfg: Mapping[str, Any]) -> Strategy:
    """The Flower strategy named by ``luar-base``, with the run's sampling settings."""
    name = str(cfg["luar-base"])
    kw = sampling_kwargs(cfg)
    server_lr = float(cfg["luar-server-lr"])
    if name == "fedavg":
        return FedAvg(**kw)
    if name == "fedprox":
        return FedProx(proximal_mu=float(cfg["proximal-mu"]), **kw)
    if name in ("fedadam", "fedyogi"):
        cls = FedAdam if name == "fedadam" else FedYogi
        return cls(
            eta=server_lr or 0.1,
            eta_l=float(cfg["lr"]),
            beta_1=float(cfg["luar-beta1"]),
            beta_2=float(cfg["luar-beta2"]),
            tau=float(cfg["luar-tau"]),
            **kw,
        )
    if name == "fedavgm":
        return FedAvgM(server_learning_rate=server_lr or 1.0, server_momentum=float(cfg["luar-server-momentum"]), **kw)
    raise ConfigError(f"unknown luar-base {name!r}; choose one of: {', '.join(BASES)}")


def check_fedluar(cfg: Mapping[str, Any]) -> None:
    """Milestones that parse, δ within the model's recyclable layers (client momentum is checked by
    the core for every method: ``fedsparse.config``)."""
    parse_milestones(str(cfg["luar-lr-milestones"]))
    try:
        layers = model_layers(cfg)
    except ValueError:
        return  # the model/dataset check reports this one
    if int(cfg["recycled-layers"]) > len(layers):
        raise ConfigError(
            f"recycled-layers = {cfg['recycled-layers']} exceeds the {len(layers)} recyclable layers of "
            f"{cfg['model']} ({cfg['luar-granularity']} level); allowed: 0 .. {len(layers)}"
        )


def build_fedluar(cfg: Mapping[str, Any]) -> Strategy:
    """LUAR over the configured base rule, from the run configuration."""
    return LUAR(
        build_base(cfg),
        int(cfg["recycled-layers"]),
        layers=model_layers(cfg),
        seed=int(cfg["seed"]),
        client_lr=(lambda t: luar_round_lr(cfg, t)) if parse_milestones(str(cfg["luar-lr-milestones"])) else None,
    )


def _unknown_base() -> Any:
    return build_base({**resolve_config({}), "luar-base": "fedsgd"})


METHOD = Method(
    name="fedluar",
    summary="FedLUAR (Kim et al., 2025): recycle the previous update of δ low-score layers; clients omit them",
    build=build_fedluar,
    client_step="clients.fedluar:fedluar_train",
    plain_model_reply=True,
    client_momentum=True,
    reply_metrics=STANDARD_REPLY_METRICS,
    keys=KEYS,
    checks=(check_fedluar,),
    error_cases=(
        ErrorCase("FedLUAR: milestones that are not rounds", {"luar-lr-milestones": "100,abc"}),
        ErrorCase("FedLUAR: keeping momentum without momentum", {"persist-momentum": True, "momentum": 0.0}),
        ErrorCase("FedLUAR: more recycled layers than the model has", {"recycled-layers": 6}),
        ErrorCase(
            "FedLUAR: an unknown base strategy (building it in code)",
            run=_unknown_base,
            given="build_base({..., 'luar-base': 'fedsgd'})",
        ),
        ErrorCase(
            "FedLUAR: keeping momentum of Adam", {"persist-momentum": True, "optimizer": "adam", "momentum": 0.9}
        ),
    ),
)


__all__ = [
    "LUAR",
    "METHOD",
    "KEYS",
    "RECYCLED_CONFIG_KEY",
    "recyclable_groups",
    "build_base",
    "build_fedluar",
    "model_layers",
    "luar_round_lr",
    "parse_milestones",
    "plot_layer_counts",
]
