"""Partial-update broadcast: deep partial updating (DPU, Qu et al.) on the federated downlink.

Each round the server aggregates the clients' models with a base rule (FedAvg by default) into
w_new, but changes only k·I weights of the **deployed model** w_dep (what clients hold): the top-k·I
of a contribution score over the partial set (the conv / linear weights, I of them; biases and other
small tensors are always updated dense). What a sampled client receives is the change from the
version it holds to the current w_dep — a codec-encoded sparse patch, or the dense model when that is
smaller (measured). See ``docs/partial-update.md`` for the method, every key and every deviation.

Contribution (``contribution``): ``global`` c = δ⊙δ (GCPU), ``local`` c_l, ``combined`` (DPU)
λ·c_g/Σc_g + (1−λ)·c_l/Σc_l, ``random`` (RPU) a uniform mask. The local term c_l is by default the
zero-byte server-side estimate Σ ρ_n δ_n² from the clients' dense updates (``local-metric =
server``); the clients' exact −Σ g⊙Δw can be sent up instead (dense, 8-bit or top-2k). RPU's
mask is chosen before local training (``random-mask = before-training``, the paper's RPU): the
clients train only those weights and send only their values.
After the broadcast (``after-broadcast``) the server continues from w_dep (``rewind``, DPU's first
step), fine-tunes the selected weights in a second, masked round (``finetune``, DPU's step 2) or
keeps w_new with the unsent part pending (``residual``). aggregate_train returns w_dep, the model
the clients hold, so that is what central evaluation measures in every mode.

The strategy depends on nothing but the messages: it learns each client's partition id from the
``partition-id`` its replies carry (or from a grid's ``partition_of`` mapping when it has one) and
falls back to node ids. Works in ``Strategy.start`` as in fedsparse's loop.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedsparse import codec
from fedsparse.accounting import array_record_bytes
from fedsparse.aggregation import weighted_mean
from fedsparse.config import ConfigError, Key
from fedsparse.hooks import MethodHooks
from fedsparse.masks import topk_mask
from fedsparse.methods import ErrorCase, Method, sampling_kwargs
from fedsparse.protocol.partial_update import (
    CONTRIBUTION_KEY,
    apply_part,
    decode_contribution,
    model_digest,
    num_updated,
    pack_parts,
    partial_names,
    random_layer_masks,
)
from fedsparse.robust import AggregationRule, apply_rule
from fedsparse.validation import check_arrays

log = logging.getLogger("fedsparse")

CONTRIBUTIONS = ("combined", "global", "local", "random")
AFTER_BROADCAST = ("rewind", "residual", "finetune")
LOCAL_METRICS = ("server", "client", "client-8bit", "client-top2k")
RANDOM_MASKS = ("before-training", "after-training")
_SENT_METRIC = {"client": "dense", "client-8bit": "8bit", "client-top2k": "top2k"}
INITIAL_SYNC = ("seed", "dense")
BASES = ("fedavg", "fedprox")
UNKNOWN = -1  # a client whose copy the server cannot vouch for (a failed round): it gets the dense model
_REPLY_ONLY_METRICS = ("partition-id", "pu-version")
#: the metrics of a partial-update reply besides num-examples (the reply screen's schema)
REPLY_METRICS = ("train-loss", *_REPLY_ONLY_METRICS)

#: The partial-update broadcast's configuration keys.
KEYS: dict[str, Key] = {
    "update-ratio": Key(
        0.05,
        "partial-update: fraction k of the partial set (weights with ndim > 1) changed per round",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=1.0,
    ),
    "contribution": Key(
        "combined",
        "partial-update: which weights change (combined = DPU, global = GCPU, local, random = RPU)",
        choices=CONTRIBUTIONS,
    ),
    "contribution-lambda": Key(
        0.5, "partial-update: weight of the global term in the combined contribution", minimum=0.0, maximum=1.0
    ),
    "after-broadcast": Key(
        "rewind",
        "partial-update: continue from the deployed model (rewind), fine-tune the selected weights in a "
        "second, masked round (finetune, DPU's step 2) or keep the unsent residual",
        choices=AFTER_BROADCAST,
    ),
    "finetune-steps": Key(
        0,
        "partial-update: local steps of a fine-tuning round (after-broadcast = finetune) and of RPU's "
        "masked rounds; 0 = the run's local-epochs / local-steps",
        minimum=0,
    ),
    "local-metric": Key(
        "server",
        "partial-update: the local term of combined / local: server = zero-byte estimate from the "
        "clients' updates; client = exact -sum g*dw sent dense; client-8bit; client-top2k",
        choices=LOCAL_METRICS,
    ),
    "random-mask": Key(
        "before-training",
        "partial-update: RPU chooses its random subset before local training (clients train only it) "
        "or after (a random subset of a full update)",
        choices=RANDOM_MASKS,
    ),
    "value-bits": Key(32, "partial-update: bits per broadcast value (32, 16 or 8)", minimum=8, maximum=32),
    "initial-sync": Key(
        "seed",
        "partial-update: first contact rebuilds the initial model from the run's seed, or receives it dense",
        choices=INITIAL_SYNC,
    ),
    "history-rounds": Key(8, "partial-update: per-round fp16/8-bit patches kept for clients catching up", minimum=0),
    "partial-base": Key("fedavg", "partial-update: base aggregation rule", choices=BASES),
}


def check_value_bits(cfg: Mapping[str, Any]) -> None:
    """Value widths the codec can write."""
    if int(cfg["value-bits"]) not in codec.VALUE_BITS:
        raise ConfigError(
            f"value-bits = {cfg['value-bits']!r} is not supported; allowed: "
            + ", ".join(str(b) for b in codec.VALUE_BITS)
        )


def check_modes(cfg: Mapping[str, Any]) -> None:
    """Combinations that have no meaning: RPU chosen before training changes only its subset, so
    there is no unsent change to keep (residual) or to fine-tune (finetune)."""
    if (
        cfg["contribution"] == "random"
        and cfg["random-mask"] == "before-training"
        and cfg["after-broadcast"] != "rewind"
    ):
        raise ConfigError(
            f"after-broadcast = {cfg['after-broadcast']!r} does not apply to contribution = 'random' with "
            "random-mask = 'before-training' (its clients train only the chosen weights); use after-broadcast = "
            "'rewind', or random-mask = 'after-training'"
        )


@dataclass
class _Patch:
    """What one client version receives this round (shared by every client at that version)."""

    kind: str  # fresh | merged | sequence | dense | empty
    base: int
    from_seed: bool
    semantics: list[str]
    payloads: list[dict[str, np.ndarray]]
    record: ArrayRecord
    nbytes: int
    stats: dict[str, Any] = field(default_factory=dict)


class PartialUpdate(Strategy, MethodHooks):
    """Partial-update broadcast wrapping a FedAvg-family ``base`` (sampling, config, aggregation).

    Parameters: ``update_ratio`` k ∈ (0, 1]; ``contribution`` one of combined | global | local |
    random; ``contribution_lambda`` λ of the combined score; ``after_broadcast`` rewind | residual;
    ``value_bits`` 32 | 16 | 8 for the broadcast values (16 / 8 quantise the per-round change, biases
    stay float32; catch-up patches merged over several rounds are always float32 so that they stay
    exact); ``initial_sync`` seed | dense (seed, the default as for the ``initial-sync`` key: clients
    rebuild version 0 themselves and check its digest, which needs a ClientApp that can, as
    fedsparse's does; pass ``"dense"`` for one that cannot); ``history_rounds`` how many per-round
    fp16 / 8-bit patches to keep for clients catching up; ``seed`` for the ``random`` mask.

    With ``after_broadcast="residual"`` and a local term (``local`` / ``combined``) the local
    contribution is kept pending like the residual itself: c_l of a weight accumulates over the
    rounds since it was last sent, so both terms of the score cover the same pending change.
    """

    def __init__(
        self,
        base: FedAvg | None = None,
        *,
        update_ratio: float = 0.05,
        contribution: str = "combined",
        contribution_lambda: float = 0.5,
        after_broadcast: str = "rewind",
        value_bits: int = 32,
        initial_sync: str = "seed",
        history_rounds: int = 8,
        seed: int = 0,
        local_metric: str = "server",
        random_mask: str = "before-training",
        finetune_steps: int = 0,
    ) -> None:
        if not 0.0 < float(update_ratio) <= 1.0:
            raise ValueError(f"update_ratio = {update_ratio!r} is out of range; allowed: 0 < k <= 1")
        if contribution not in CONTRIBUTIONS:
            raise ValueError(f"unknown contribution {contribution!r}; choose one of: {', '.join(CONTRIBUTIONS)}")
        if not 0.0 <= float(contribution_lambda) <= 1.0:
            raise ValueError(f"contribution_lambda = {contribution_lambda!r} is out of range; allowed: 0 .. 1")
        if after_broadcast not in AFTER_BROADCAST:
            raise ValueError(
                f"unknown after_broadcast {after_broadcast!r}; choose one of: {', '.join(AFTER_BROADCAST)}"
            )
        if value_bits not in codec.VALUE_BITS:
            raise ValueError(f"unsupported value_bits={value_bits!r}; choose one of: 32, 16, 8")
        if initial_sync not in INITIAL_SYNC:
            raise ValueError(f"unknown initial_sync {initial_sync!r}; choose one of: {', '.join(INITIAL_SYNC)}")
        if history_rounds < 0:
            raise ValueError(f"history_rounds = {history_rounds!r} must be >= 0")
        if local_metric not in LOCAL_METRICS:
            raise ValueError(f"unknown local_metric {local_metric!r}; choose one of: {', '.join(LOCAL_METRICS)}")
        if random_mask not in RANDOM_MASKS:
            raise ValueError(f"unknown random_mask {random_mask!r}; choose one of: {', '.join(RANDOM_MASKS)}")
        if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
            raise ValueError(f"finetune_steps = {finetune_steps!r} must be an integer >= 0")
        if contribution == "random" and random_mask == "before-training" and after_broadcast != "rewind":
            raise ValueError(
                f"after_broadcast = {after_broadcast!r} does not apply to RPU chosen before training; use 'rewind'"
            )
        self.base = base if base is not None else FedAvg()
        self.update_ratio = float(update_ratio)
        self.contribution = contribution
        self.contribution_lambda = float(contribution_lambda)
        self.after_broadcast = after_broadcast
        self.value_bits = int(value_bits)
        self.initial_sync = initial_sync
        self.history_rounds = int(history_rounds)
        self.seed = int(seed)
        self.local_metric = local_metric
        self.random_mask = random_mask
        self.finetune_steps = int(finetune_steps)
        self._rng = torch.Generator().manual_seed(self.seed)
        # --- state (see state_dict) ---
        self.w_dep: dict[str, np.ndarray] | None = None  # the deployed model (what clients hold)
        self.w_srv: dict[str, np.ndarray] | None = None  # residual mode: the server's model w_new
        # residual mode with a local term: c_l accumulated since each weight was last sent (float64)
        self.c_pending: dict[str, np.ndarray] | None = None
        self.version = 0
        self.init_digest = ""
        self.digest = ""
        self.partial: list[str] = []
        self.last_changed: dict[str, np.ndarray] = {}  # partial tensors: version of each weight's last change
        self.tensor_changed: dict[str, int] = {}  # other tensors: version of the last change
        self.client_versions: dict[str, int] = {}  # "p:<partition>" or "n:<node>" → version held
        self.history: deque[tuple[int, dict[str, np.ndarray]]] = deque(maxlen=max(self.history_rounds, 1))
        self._pid_of_node: dict[int, int] = {}
        self._pending: dict[int, int] = {}  # node → target version sent this round
        self._reports: dict[int, dict[str, Any]] = {}
        self._dense_cache: tuple[int, _Patch] | None = None
        # finetune: the version whose selected weights the next round fine-tunes (None: none pending)
        self.finetune_of: int | None = None
        # this round: "train" (full local training), "rpu" or "finetune" (masked), and its mask
        self._phase = "train"
        self._train_masks: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ Strategy interface
    def use_aggregation(self, rule: AggregationRule) -> PartialUpdate:
        """The base rule (FedAvg / FedProx over the clients' models, against the deployed model they
        trained from) combines the replies with ``rule`` (:mod:`fedsparse.robust`) first; the top-k·I
        broadcast then acts on its result as on the mean."""
        self.base = apply_rule(self.base, rule)
        return self

    def summary(self) -> None:
        log.info(
            "partial-update: k=%s contribution=%s local-metric=%s after-broadcast=%s value-bits=%s initial-sync=%s base=%s",
            self.update_ratio,
            self.contribution,
            self.local_metric,
            self.after_broadcast,
            self.value_bits,
            self.initial_sync,
            type(self.base).__name__,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample with the base rule; send each client the change from its version to w_dep.

        ``arrays`` initialises the deployed model (version 0) on the first call; afterwards the
        strategy's own w_dep is authoritative (it is what aggregate_train returned).
        """
        if self.w_dep is None:
            self._initialise({k: a.numpy() for k, a in arrays.items()})
        assert self.w_dep is not None
        known = getattr(grid, "partition_of", None)
        if isinstance(known, Mapping):
            self._pid_of_node.update({int(n): int(p) for n, p in known.items() if int(p) >= 0})
        messages = list(self.base.configure_train(server_round, self._record(self.w_dep), config, grid))
        self._phase, self._train_masks, round_cfg = self._plan_round()
        cache: dict[Any, _Patch] = {}
        contents: dict[Any, RecordDict] = {}
        out: list[Message] = []
        sent: list[tuple[int | None, _Patch]] = []
        self._pending = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            held = self.client_versions.get(self._key(node))
            patch = cache.get(held)
            if patch is None:
                patch = cache[held] = self._patch_for(held, finetune=self._phase == "finetune")
            if held not in contents:
                cfg = ConfigRecord(dict(msg.content["config"].items()))
                cfg.update(
                    {
                        "pu-base-version": patch.base,
                        "pu-target-version": self.version,
                        "pu-target-hash": self.digest,
                        "pu-from-seed": patch.from_seed,
                        "pu-local-contribution": self._client_metric is not None and self._phase == "train",
                        **round_cfg,
                    }
                )
                if self._client_metric is not None:
                    cfg["pu-local-metric"] = self._client_metric
                    cfg["pu-local-topk"] = min(self.partial_size, 2 * num_updated(self.update_ratio, self.partial_size))
                if self._phase == "finetune":
                    cfg["pu-mask-part"] = len(patch.semantics) - 1
                if patch.from_seed:
                    cfg["pu-init-hash"] = self.init_digest
                if patch.semantics:  # a ConfigRecord cannot hold an empty list
                    cfg["pu-parts"] = list(patch.semantics)
                contents[held] = RecordDict({"arrays": patch.record, "config": cfg})
            out.append(
                Message(
                    content=contents[held],
                    dst_node_id=node,
                    message_type=msg.metadata.message_type or MessageType.TRAIN,
                    group_id=msg.metadata.group_id,
                )
            )
            self._pending[node] = self.version
            sent.append((held, patch))
        self._reports[server_round] = self._downlink_report(sent)
        self._reports[server_round]["phase"] = self._phase
        return out

    @property
    def _client_metric(self) -> str | None:
        """How clients send the exact local metric (None: they send none)."""
        if self.contribution not in ("local", "combined") or self.local_metric == "server":
            return None
        return _SENT_METRIC[self.local_metric]

    def _plan_round(self) -> tuple[str, dict[str, np.ndarray] | None, dict[str, Any]]:
        """This round's phase, its training mask and the config entries that tell the clients."""
        assert self.w_dep is not None
        if self.contribution == "random" and self.random_mask == "before-training":
            # RPU as the paper runs it: the subset is drawn before training, from the seeded generator
            mask_seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
            shapes = {n: tuple(self.w_dep[n].shape) for n in self.partial}
            masks = random_layer_masks(shapes, self.update_ratio, mask_seed)
            extra = {
                "pu-train-mask": "seed",
                "pu-mask-seed": mask_seed,
                "pu-mask-ratio": self.update_ratio,
                "pu-train-steps": self.finetune_steps,
            }
            return "rpu", masks, extra
        if self.after_broadcast == "finetune" and self.finetune_of == self.version:
            masks = {n: self.last_changed[n] == self.version for n in self.partial}
            return "finetune", masks, {"pu-train-mask": "part", "pu-train-steps": self.finetune_steps}
        return "train", None, {"pu-train-mask": "none"}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Base aggregation → w_new; top-k·I of the contribution changes w_dep; returns w_dep."""
        assert self.w_dep is not None, "configure_train must run before aggregate_train"
        replies = list(replies)
        pending, self._pending = self._pending, {}
        usable: list[Message] = []
        contributions: list[tuple[float, Mapping[str, np.ndarray]]] = []
        answered: set[int] = set()
        for msg in replies:
            if msg.has_error():
                continue
            node = msg.metadata.src_node_id
            metrics = msg.content["metrics"] if "metrics" in msg.content else MetricRecord()
            pid = int(metrics.get("partition-id", -1))
            if pid >= 0:
                self._learn_partition(node, pid)
            stale = self._stale_reason(msg, pending)
            if stale is not None:
                # fedsparse's reply screen rejects these already (validate_reply); this guards
                # Flower's own Strategy.start, which has no screen. Not "answered": resynchronised densely.
                log.warning("partial-update: ignoring a reply from node %s: %s", node, stale)
                continue
            answered.add(node)
            self.client_versions[self._key(node)] = int(metrics["pu-version"])
            clean = MetricRecord({k: v for k, v in metrics.items() if k not in _REPLY_ONLY_METRICS})
            usable.append(
                Message(
                    content=RecordDict({"arrays": msg.content["arrays"], "metrics": clean}),
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                )
            )
            weight = float(clean.get("num-examples", 1))
            if self._phase == "train" and self.contribution in ("local", "combined"):
                if self._client_metric is None:
                    # zero-byte estimate: Σ ρ_n δ_n² from the dense update the server holds anyway
                    sent = msg.content["arrays"]
                    contributions.append(
                        (
                            weight,
                            {
                                n: (sent[n].numpy().astype(np.float64) - self.w_dep[n].astype(np.float64)) ** 2
                                for n in self.partial
                            },
                        )
                    )
                elif CONTRIBUTION_KEY in msg.content:
                    contributions.append(
                        (
                            weight,
                            decode_contribution(
                                msg.content[CONTRIBUTION_KEY],
                                self._client_metric,
                                {n: tuple(self.w_dep[n].shape) for n in self.partial},
                            ),
                        )
                    )
        for node in pending:
            if node not in answered:  # it may or may not have applied the patch: resynchronise it densely
                self.client_versions[self._key(node)] = UNKNOWN
        report = self._reports.setdefault(server_round, {})
        report.update({"k": self.update_ratio, "partial_weights": self.partial_size, "updated_weights": 0})
        if self._phase != "train":
            return self._aggregate_masked(usable, report)
        if not usable:
            report["deployed_version"] = self.version
            return self._record(self.w_dep), None
        aggregated, metrics = self.base.aggregate_train(server_round, usable)
        if aggregated is None:
            report["deployed_version"] = self.version
            return self._record(self.w_dep), metrics
        self._advance({k: a.numpy() for k, a in aggregated.items()}, contributions, report)
        if self.after_broadcast == "finetune":
            self.finetune_of = self.version  # the next round fine-tunes what this one selected
        return self._record(self.w_dep), metrics

    def _aggregate_masked(
        self, usable: list[Message], report: dict[str, Any]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A masked round (RPU, DPU's fine-tuning): the replies carry only the masked values of the
        partial set (and the small tensors whole); their num-examples-weighted mean replaces w_dep
        at exactly those positions, which are then broadcast like any round's change."""
        assert self.w_dep is not None and self._train_masks is not None
        self.finetune_of = None  # fine-tuned or not, the next round trains in full
        masks = self._train_masks
        dep = self.w_dep
        replies = [(float(m.content["metrics"].get("num-examples", 1)), m.content["arrays"]) for m in usable]
        total = sum(w for w, _ in replies)
        if not replies or total <= 0:
            report["deployed_version"] = self.version
            return self._record(dep), None
        weights = [w / total for w, _ in replies]
        w_new = {}
        for name, held in dep.items():
            mean = weighted_mean([rec[name].numpy() for _, rec in replies], weights)
            if name in masks:
                full = held.copy()
                full[masks[name]] = mean.astype(held.dtype)
                w_new[name] = full
            else:
                w_new[name] = _as_dtype(mean, held.dtype)
        self._deploy(w_new, masks, report)
        return self._record(self.w_dep), None

    def validate_reply(self, server_round: int, msg: Message) -> str | None:
        """fedsparse's reply screen hook (``fedsparse.validation``): None to accept, else the reason.

        A reply must carry the whole model (the deployed model's names, shapes and dtypes, finite;
        in a masked round the partial set's masked values only),
        the version it trained from — which must be the current deployed version, sent to that node
        this round (a stale reply is rejected here, so the screen counts it as rejected and
        ``min-replies`` sees only usable replies) — and, for the local / combined contribution, a
        finite float32 contribution for exactly the partial set. A rejected reply is not aggregated,
        and its client is resynchronised densely at its next round.
        """
        if self.w_dep is None:
            return "no round has been configured yet"
        records = msg.content.array_records
        metric = self._client_metric if self._phase == "train" else None
        expected = {"arrays", CONTRIBUTION_KEY} if metric is not None else {"arrays"}
        if set(records) != expected:
            return f"expected ArrayRecords {sorted(expected)}, found {sorted(records)}"
        spec = {k: (tuple(v.shape), v.dtype.str) for k, v in self.w_dep.items()}
        if self._train_masks is not None:
            # a masked round: the partial set's masked values only (1-D, in mask order)
            for n, m in self._train_masks.items():
                spec[n] = ((int(m.sum()),), self.w_dep[n].dtype.str)
        problem = check_arrays(records["arrays"], spec)
        if problem is None and metric == "dense":
            cspec = {n: (tuple(self.w_dep[n].shape), np.dtype(np.float32).str) for n in self.partial}
            problem = check_arrays(records[CONTRIBUTION_KEY], cspec, what="contribution")
        elif problem is None and metric is not None:
            try:
                decode_contribution(
                    records[CONTRIBUTION_KEY], metric, {n: tuple(self.w_dep[n].shape) for n in self.partial}
                )
            except (ValueError, RuntimeError) as err:
                problem = f"contribution ({metric}): {err}"
        if problem is None:
            metrics = msg.content["metrics"]
            version = metrics.get("pu-version")
            if isinstance(version, bool) or not isinstance(version, int):
                problem = f"no integer 'pu-version' in the reply's metrics (got {version!r}); is its client step partial-update's?"
            else:
                problem = self._stale_reason(msg, self._pending)
        return problem

    def _stale_reason(self, msg: Message, pending: Mapping[int, int]) -> str | None:
        """Why a reply cannot be aggregated this round (trained from another version than the one
        deployed, or from a node not sent the current version this round), or None."""
        node = msg.metadata.src_node_id
        metrics = msg.content["metrics"] if "metrics" in msg.content else MetricRecord()
        held = metrics.get("pu-version", UNKNOWN)
        if pending.get(node) != self.version:
            return f"node {node} was not sent version {self.version} of the deployed model this round"
        if held != self.version:
            return f"trained from version {held} of the deployed model, not the current version {self.version} (stale)"
        return None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation would need patches too; it is not offered (evaluate centrally)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ reports
    def round_report(self, server_round: int) -> dict[str, Any]:
        """rounds.csv columns: k, updated_weights, the round's downlink patches and their bounds."""
        return dict(self._reports.get(server_round, {}))

    def final_report(self, out_dir: Any) -> dict[str, Any]:
        reports = list(self._reports.values())
        kinds: Counter[str] = Counter()
        for r in reports:
            for item in str(r.get("patch_kinds", "")).split(";"):
                if item:
                    name, count = item.split(":")
                    kinds[name] += int(count)
        return {
            "partial_update": {
                "k": self.update_ratio,
                "contribution": self.contribution,
                "local_metric": self.local_metric,
                "random_mask": self.random_mask,
                "after_broadcast": self.after_broadcast,
                "value_bits": self.value_bits,
                "initial_sync": self.initial_sync,
                "partial_weights": self.partial_size,
                "deployed_version": self.version,
                "patch_kinds": dict(kinds),
                "shannon_bound_bytes": float(sum(r.get("shannon_bound_bytes", 0.0) for r in reports)),
                "patch_bytes_down": int(sum(r.get("patch_bytes_down", 0) for r in reports)),
            }
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: numpy arrays and JSON-able values."""
        return {
            "w_dep": None if self.w_dep is None else {k: v.copy() for k, v in self.w_dep.items()},
            "w_srv": None if self.w_srv is None else {k: v.copy() for k, v in self.w_srv.items()},
            "c_pending": None if self.c_pending is None else {k: v.copy() for k, v in self.c_pending.items()},
            "version": self.version,
            "init_digest": self.init_digest,
            "digest": self.digest,
            "partial": list(self.partial),
            "last_changed": {k: v.copy() for k, v in self.last_changed.items()},
            "tensor_changed": dict(self.tensor_changed),
            "client_versions": dict(self.client_versions),
            "partition_of_node": {str(n): p for n, p in self._pid_of_node.items()},
            "history": [{"version": v, "payload": {k: a.copy() for k, a in p.items()}} for v, p in self.history],
            "rng": self._rng.get_state().numpy().copy(),
            "finetune_of": self.finetune_of,
            "reports": {str(r): dict(v) for r, v in self._reports.items()},
            "base": _base_state(self.base),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.w_dep = None if state["w_dep"] is None else {k: np.array(v) for k, v in state["w_dep"].items()}
        self.w_srv = None if state["w_srv"] is None else {k: np.array(v) for k, v in state["w_srv"].items()}
        pending = state.get("c_pending")
        self.c_pending = None if pending is None else {k: np.array(v, dtype=np.float64) for k, v in pending.items()}
        self.version = int(state["version"])
        self.init_digest = str(state["init_digest"])
        self.digest = str(state["digest"])
        self.partial = list(state["partial"])
        self.last_changed = {k: np.array(v, dtype=np.int32) for k, v in state["last_changed"].items()}
        self.tensor_changed = {k: int(v) for k, v in state["tensor_changed"].items()}
        self.client_versions = {str(k): int(v) for k, v in state["client_versions"].items()}
        self._pid_of_node = {int(n): int(p) for n, p in state["partition_of_node"].items()}
        self.history = deque(
            ((int(h["version"]), {k: np.array(a) for k, a in h["payload"].items()}) for h in state["history"]),
            maxlen=max(self.history_rounds, 1),
        )
        self._rng.set_state(torch.from_numpy(np.array(state["rng"], dtype=np.uint8)))
        finetune_of = state.get("finetune_of")
        self.finetune_of = None if finetune_of is None else int(finetune_of)
        self._reports = {int(r): dict(v) for r, v in state.get("reports", {}).items()}
        _load_base_state(self.base, state.get("base", {}))
        self._dense_cache = None
        self._pending = {}

    # ------------------------------------------------------------------ internals
    @property
    def partial_size(self) -> int:
        assert self.w_dep is not None
        return int(sum(self.w_dep[n].size for n in self.partial))

    def _initialise(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.w_dep = {k: np.array(v, copy=True) for k, v in arrays.items()}
        self.partial = partial_names(self.w_dep)
        self.last_changed = {n: np.zeros(self.w_dep[n].shape, dtype=np.int32) for n in self.partial}
        self.tensor_changed = {n: 0 for n in self.w_dep if n not in self.partial}
        self.version = 0
        self.init_digest = self.digest = model_digest(self.w_dep)

    @staticmethod
    def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
        return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})

    def _learn_partition(self, node: int, pid: int) -> None:
        """Re-key a client known by node id to its partition id once we learn it."""
        if self._pid_of_node.get(node) == pid:
            return
        self._pid_of_node[node] = pid
        old = f"n:{node}"
        if old in self.client_versions:
            self.client_versions[f"p:{pid}"] = self.client_versions.pop(old)

    def _key(self, node: int) -> str:
        pid = self._pid_of_node.get(node)
        return f"p:{pid}" if pid is not None else f"n:{node}"

    # --- patches ---
    def _finish(self, kind: str, base: int, from_seed: bool, semantics: list[str], payloads: list[dict]) -> _Patch:
        record = pack_parts(payloads)
        nbytes = int(sum(array_record_bytes(record).values()))
        return _Patch(kind, base, from_seed, semantics, payloads, record, nbytes, self._patch_stats(payloads))

    def _dense_patch(self) -> _Patch:
        if self._dense_cache is None or self._dense_cache[0] != self.version:
            assert self.w_dep is not None
            payload = codec.encode(self.w_dep, {}, 32)
            self._dense_cache = (self.version, self._finish("dense", -1, False, ["assign"], [payload]))
        return self._dense_cache[1]

    def _merged_payload(self, since: int, before: int | None = None) -> dict[str, np.ndarray]:
        """Every weight changed after version ``since`` (and, with ``before``, last changed before
        that version), with its current (float32, exact) value."""
        assert self.w_dep is not None
        tensors: dict[str, np.ndarray] = {}
        masks: dict[str, np.ndarray | None] = {}
        for name, arr in self.w_dep.items():
            if name in self.last_changed:
                mask = self.last_changed[name] > since
                if before is not None:
                    mask &= self.last_changed[name] < before
                if mask.any():
                    tensors[name], masks[name] = arr, mask
            elif self.tensor_changed[name] > since:
                tensors[name], masks[name] = arr, None
        return codec.encode(tensors, masks, 32)

    def _finetune_part(self) -> dict[str, np.ndarray]:
        """The weights of the partial set whose last change is the current version — the ones a
        fine-tuning round trains — with their current values. Applied with ``assign`` it changes
        nothing for a client that holds w_dep already; its positions are the clients' mask."""
        assert self.w_dep is not None
        tensors = {n: self.w_dep[n] for n in self.partial}
        masks: dict[str, np.ndarray | None] = {n: self.last_changed[n] == self.version for n in self.partial}
        return codec.encode(tensors, masks, 32)

    def _patch_for(self, held: int | None, *, finetune: bool = False) -> _Patch:
        """The smallest (measured) patch that brings a client at version ``held`` to w_dep.

        ``finetune``: the patch's last part also names the weights to fine-tune (the positions the
        current version changed): a merged patch is split in two (changed before this version,
        changed by it) at the cost of a second header, any other patch gets that part appended."""
        if finetune:
            return self._finetune_patch_for(held)
        if held is None and self.initial_sync == "seed":
            base, from_seed = 0, True
        elif held is None or held == UNKNOWN or held > self.version or held < 0:
            return self._dense_patch()
        else:
            base, from_seed = held, False
        if base == self.version:
            return self._finish("empty", base, from_seed, [], [])
        lag_kind = "fresh" if base == self.version - 1 else "merged"
        candidates: list[_Patch] = []
        if self.value_bits < 32:
            stored = {v: p for v, p in self.history}
            if all(v in stored for v in range(base, self.version)):
                seq = [stored[v] for v in range(base, self.version)]
                candidates.append(
                    self._finish("fresh" if len(seq) == 1 else "sequence", base, from_seed, ["add"] * len(seq), seq)
                )
        candidates.append(self._finish(lag_kind, base, from_seed, ["assign"], [self._merged_payload(base)]))
        candidates.append(self._dense_patch())
        return min(candidates, key=lambda p: p.nbytes)  # ties keep the earlier (sparser) candidate

    def _finetune_patch_for(self, held: int | None) -> _Patch:
        plain = self._patch_for(held)
        part = self._finetune_part()
        candidates = [
            self._finish(plain.kind, plain.base, plain.from_seed, [*plain.semantics, "assign"], [*plain.payloads, part])
        ]
        if plain.kind in ("fresh", "merged"):
            split = [self._merged_payload(plain.base, before=self.version), part]
            candidates.append(self._finish(plain.kind, plain.base, plain.from_seed, ["assign", "assign"], split))
        return min(candidates, key=lambda p: p.nbytes)

    def _patch_stats(self, payloads: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        """Index bytes, Shannon bound and index kinds of a patch, from the codec headers."""
        total_i = self.partial_size
        index_bytes = 0
        bound = index_bound = 0.0
        kinds: Counter[str] = Counter()
        for payload in payloads:
            info = codec.tensor_nbytes(payload)
            nnz = values = dense = 0
            for name, t in info.items():
                if name in self.last_changed:
                    nnz += t["nnz"]
                    values += t["value_bytes"]
                    index_bytes += t["index_bytes"]
                    kinds[t["kind"]] += 1
                else:
                    dense += t["value_bytes"] + (t["index_bytes"] if t["kind"] == "raw" else 0)
            h = codec.shannon_bound_bytes(total_i, nnz)
            index_bound += h
            bound += h + values + dense
        return {"index_bytes": index_bytes, "shannon_index": index_bound, "shannon_bound": bound, "kinds": kinds}

    def _downlink_report(self, sent: list[tuple[int | None, _Patch]]) -> dict[str, Any]:
        kinds: Counter[str] = Counter()
        index_kinds: Counter[str] = Counter()
        lags = []
        for held, patch in sent:
            kinds[patch.kind] += 1
            index_kinds.update(patch.stats["kinds"])
            lags.append(self.version - (held if held is not None and held >= 0 else 0))
        fresh = [p.nbytes for _, p in sent if p.kind == "fresh"]
        return {
            "patch_kinds": ";".join(f"{k}:{v}" for k, v in sorted(kinds.items())),
            "fresh_patch_bytes": float(np.mean(fresh)) if fresh else math.nan,
            "index_kinds": ";".join(f"{k}:{v}" for k, v in sorted(index_kinds.items())),
            "clients_dense": kinds.get("dense", 0),
            "mean_version_lag": float(np.mean(lags)) if lags else 0.0,
            "patch_bytes_down": int(sum(p.nbytes for _, p in sent)),
            "index_bytes_down": int(sum(p.stats["index_bytes"] for _, p in sent)),
            "shannon_index_bytes": float(sum(p.stats["shannon_index"] for _, p in sent)),
            "shannon_bound_bytes": float(sum(p.stats["shannon_bound"] for _, p in sent)),
        }

    # --- the round's update of w_dep ---
    def _advance(
        self,
        aggregated: Mapping[str, np.ndarray],
        contributions: list[tuple[float, Mapping[str, np.ndarray]]],
        report: dict[str, Any],
    ) -> None:
        assert self.w_dep is not None
        dep = self.w_dep
        if set(aggregated) != set(dep):
            raise ValueError(
                f"the base rule returned arrays {sorted(aggregated)}, the deployed model has {sorted(dep)}"
            )
        avg = {k: _as_dtype(aggregated[k], dep[k].dtype) for k in dep}
        if self.after_broadcast == "residual":
            srv = self.w_srv if self.w_srv is not None else dep
            w_new = {
                k: (srv[k] + (avg[k] - dep[k])).astype(dep[k].dtype) if dep[k].dtype.kind == "f" else avg[k]
                for k in dep
            }
        else:
            w_new = avg
        delta = {n: (w_new[n] - dep[n]).astype(np.float32) for n in self.partial}
        c_local = None
        if self.contribution in ("local", "combined"):
            c_local = self._local_contribution(contributions)
            if self.after_broadcast == "residual" and self.c_pending is not None:
                # δ holds the pending residual of earlier rounds: score it with their pending c_l too
                c_local = {n: c_local[n] + torch.from_numpy(self.c_pending[n]) for n in self.partial}
        scores = self._scores(delta, contributions, c_local=c_local)
        k = num_updated(self.update_ratio, self.partial_size)
        mask = {n: m.numpy() for n, m in topk_mask(scores, k).items()}
        self._deploy(w_new, mask, report)
        self.w_srv = w_new if self.after_broadcast == "residual" else None
        if self.after_broadcast == "residual" and c_local is not None:
            # mirrors the residual: what was sent starts afresh, the rest stays pending
            self.c_pending = {n: np.where(mask[n], 0.0, c_local[n].numpy()) for n in self.partial}
        if self.w_srv is not None:
            report["residual_norm"] = float(
                math.sqrt(
                    sum(
                        float(np.sum((self.w_srv[n].astype(np.float64) - self.w_dep[n]) ** 2))  # type: ignore[index]
                        for n in self.partial
                    )
                )
            )

    def _deploy(self, w_new: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray], report: dict[str, Any]) -> None:
        """w_dep ← w_dep + (w_new − w_dep) ⊙ mask on the partial set (the small tensors take
        w_new's values); a new version, its digest, the per-weight change versions and, for fp16 /
        8-bit values, the quantised patch the clients will apply."""
        assert self.w_dep is not None
        dep = self.w_dep
        delta = {n: (w_new[n] - dep[n]).astype(np.float32) for n in self.partial}
        new_version = self.version + 1
        changed_dense = [n for n in dep if n not in self.last_changed and w_new[n].tobytes() != dep[n].tobytes()]
        if self.value_bits == 32:
            # assign semantics: the selected weights take w_new's exact values
            new_dep = dict(dep)
            for n in self.partial:
                new_dep[n] = np.where(mask[n], w_new[n], dep[n])
            for n in changed_dense:
                new_dep[n] = w_new[n].copy()
        else:
            # add semantics: the quantised change, applied exactly as the clients apply it
            tensors: dict[str, np.ndarray] = {}
            masks: dict[str, np.ndarray | None] = {}
            for n in self.partial:
                if mask[n].any():
                    tensors[n], masks[n] = delta[n], mask[n]
            for n in changed_dense:
                tensors[n], masks[n] = w_new[n], None
            payload = codec.encode(tensors, masks, self.value_bits, raw_dense=True)
            new_dep = apply_part(dep, payload, "add")
            if self.history_rounds > 0:
                self.history.append((self.version, payload))
        for n in self.partial:
            # only the weights whose bits changed: a selected weight with δ = 0 (or an 8-bit step that
            # rounds to nothing) keeps its value, so a catch-up patch need not carry it
            self.last_changed[n][mask[n] & _bits_differ(new_dep[n], dep[n])] = new_version
        for n in changed_dense:
            self.tensor_changed[n] = new_version
        self.w_dep = new_dep
        self.version = new_version
        self.digest = model_digest(new_dep)
        report["updated_weights"] = int(sum(int(m.sum()) for m in mask.values()))
        report["deployed_version"] = self.version

    def _scores(
        self,
        delta: Mapping[str, np.ndarray],
        contributions: list[tuple[float, Mapping[str, np.ndarray]]],
        *,
        c_local: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Contribution of every weight of the partial set (higher = sent first). ``c_local``: the
        local term when the caller has it already (residual mode adds the pending part), else it is
        aggregated from ``contributions``."""
        if self.contribution == "random":
            total = self.partial_size
            perm = torch.randperm(total, generator=self._rng).to(torch.float64)
            out, offset = {}, 0
            for n in self.partial:  # a uniformly random ranking: top-k of it is a uniform k-subset
                size = delta[n].size
                out[n] = perm[offset : offset + size].reshape(delta[n].shape)
                offset += size
            return out
        c_global = {n: torch.from_numpy(delta[n].astype(np.float64) ** 2) for n in self.partial}
        if self.contribution == "global":
            return c_global
        if c_local is None:
            c_local = self._local_contribution(contributions)
        if self.contribution == "local":
            return c_local
        lam = self.contribution_lambda
        g_sum = float(sum(float(c.sum()) for c in c_global.values()))
        l_sum = float(sum(float(c.sum()) for c in c_local.values()))
        if not (math.isfinite(l_sum) and l_sum > 0):  # momentum can make Σc_l ≤ 0; fall back to Σ|c_l|
            l_sum = float(sum(float(c.abs().sum()) for c in c_local.values()))
        g_scale = lam / g_sum if g_sum > 0 else 0.0
        l_scale = (1.0 - lam) / l_sum if l_sum > 0 else 0.0
        return {n: g_scale * c_global[n] + l_scale * c_local[n] for n in self.partial}

    def _local_contribution(
        self, contributions: list[tuple[float, Mapping[str, np.ndarray]]]
    ) -> dict[str, torch.Tensor]:
        """The clients' −Σ g ⊙ Δw, averaged with their num-examples weights (as the models are)."""
        assert self.w_dep is not None
        out = {n: np.zeros(self.w_dep[n].shape, dtype=np.float64) for n in self.partial}
        total = sum(w for w, _ in contributions)
        if not contributions or total <= 0:
            raise ValueError(
                f"contribution = {self.contribution!r} needs the clients' local contributions, but no reply "
                f"carried a '{CONTRIBUTION_KEY}' record (is the client step partial-update's?)"
            )
        for weight, arrays in contributions:
            for n in self.partial:
                if n in arrays:
                    out[n] += (weight / total) * np.asarray(arrays[n], dtype=np.float64)
        return {n: torch.from_numpy(v) for n, v in out.items()}


def _bits_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: the two arrays' bytes differ (−0.0 vs 0.0 counts, as it does for the digest)."""
    width = np.dtype(f"u{a.dtype.itemsize}")
    return np.ascontiguousarray(a).view(width) != np.ascontiguousarray(b).view(width)


def _as_dtype(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == dtype:
        return arr
    if dtype.kind in "iub":
        return np.rint(arr).astype(dtype)
    return arr.astype(dtype)


_BASE_STATE_ATTRS = ("current_arrays", "m_t", "v_t")


def _base_state(base: Strategy) -> dict[str, Any]:
    """The base rule's own state: FedAvg / FedProx have none; FedOpt-family keep these arrays."""
    out: dict[str, Any] = {}
    for attr in _BASE_STATE_ATTRS:
        value = getattr(base, attr, None)
        if isinstance(value, dict):
            out[attr] = {k: np.array(v) for k, v in value.items()}
    return out


def _load_base_state(base: Strategy, state: Mapping[str, Any]) -> None:
    for attr, value in state.items():
        setattr(base, attr, {k: np.array(v) for k, v in value.items()})


def build_partial_update(cfg: Mapping[str, Any]) -> Strategy:
    """The partial-update broadcast over the configured base rule, from the run configuration."""
    kwargs = sampling_kwargs(cfg)
    base: FedAvg
    if cfg["partial-base"] == "fedprox":
        base = FedProx(proximal_mu=float(cfg["proximal-mu"]), **kwargs)
    else:
        base = FedAvg(**kwargs)
    return PartialUpdate(
        base,
        update_ratio=float(cfg["update-ratio"]),
        contribution=str(cfg["contribution"]),
        contribution_lambda=float(cfg["contribution-lambda"]),
        after_broadcast=str(cfg["after-broadcast"]),
        value_bits=int(cfg["value-bits"]),
        initial_sync=str(cfg["initial-sync"]),
        history_rounds=int(cfg["history-rounds"]),
        seed=int(cfg["seed"]),
        local_metric=str(cfg["local-metric"]),
        random_mask=str(cfg["random-mask"]),
        finetune_steps=int(cfg["finetune-steps"]),
    )


METHOD = Method(
    reply_metrics=REPLY_METRICS,
    name="partial-update",
    summary="Partial-update broadcast (deep partial updating, Qu et al.): the downlink carries only k·I changed weights",
    build=build_partial_update,
    client_step="clients.partial_update:partial_update_train",
    keys=KEYS,
    checks=(check_value_bits, check_modes),
    error_cases=(
        ErrorCase("partial-update: unsupported value bits", {"value-bits": 12}),
        ErrorCase(
            "partial-update: RPU before training cannot fine-tune",
            {"contribution": "random", "after-broadcast": "finetune"},
        ),
    ),
)
