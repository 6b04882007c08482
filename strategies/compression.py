"""Uplink-compression baselines as Flower strategies: Top-k with error feedback, Rand-k, FedPAQ.

All three keep FedAvg's round (sample clients, send the dense global model, average) and change
only the uplink: each client sends its **update** Δ_i = w_i − w_global compressed, the server decodes
every reply, averages the updates weighted by ``num-examples`` and applies the average,
w ← w + Σ_i ρ_i Δ̂_i (non-floating tensors, e.g. BN's ``num_batches_tracked``, are sent as values and
averaged like FedAvg does). The compressors and payload formats live in :mod:`clients.compression`.

* **Top-k + error feedback** — Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory" (NeurIPS 2018);
  Aji & Heafield, "Sparse Communication for Distributed Gradient Descent" (EMNLP 2017). The client
  adds its residual e to Δ, sends the k = ``compress-ratio``·d entries of largest |Δ + e| through the
  sparse codec (float32 values + bitmap/varint index) and keeps the rest as its new residual, in its
  Flower ``context.state``.
* **Rand-k** — Konečný et al., "Federated Learning: Strategies for Improving Communication
  Efficiency" (2016), random-mask / subsampled updates: k uniformly random entries per tensor, scaled
  by n/k so the average is unbiased; the mask is drawn from a seed that travels in the payload, so no
  index is sent (``randk-index = "codec"`` sends the index instead).
* **FedPAQ** — Reisizadeh et al., "FedPAQ: A Communication-Efficient Federated Learning Method with
  Periodic Averaging and Quantization" (AISTATS 2020), with the QSGD stochastic quantiser of Alistarh
  et al. (NeurIPS 2017): s = ``quant-levels`` levels, one float32 norm per tensor, codes bit-packed.

The strategies depend only on the messages (the round's config tells the clients which compressor to
run), so they work in ``Strategy.start`` in any Flower deployment whose ClientApp calls
:func:`clients.compression.compress_update`.

Combinations (built by composition, no change to the wrapped strategies):

* ``fedluar-paq`` — FedLUAR's layer recycling (:class:`strategies.fedluar.LUAR`) around FedPAQ (the
  FedLUAR paper's Table 4): recycled layers are not sent at all, the others are quantised.
* ``feddip-luar`` — FedDIP whose clients leave LUAR's recycled layers out of their (sparse) uplink.
* DPU + 8-bit values is ``strategy = "partial-update"`` with ``value-bits = 8`` (no new code).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg, Strategy

from clients import compression as cc
from fedsparse import codec
from fedsparse.config import Config, ConfigError, Key, cross_check, register_keys
from fedsparse.validation import check_arrays
from strategies.registry import register_strategy, sampling_kwargs

log = logging.getLogger("fedsparse")

TOPK_SCOPES = ("model", "tensor")
RANDK_SCALES = ("unbiased", "none")
RANDK_INDEX = ("seed", "codec")

register_keys(
    "compression",
    {
        "compress-ratio": Key(
            0.1, "Top-k / Rand-k: fraction k of the update's entries a client sends",
            minimum=0.0, exclusive_minimum=True, maximum=1.0,
        ),
        "topk-scope": Key(
            "model", "Top-k: one selection over the whole update (model, as Stich et al.) or k per tensor", choices=TOPK_SCOPES
        ),
        "topk-error-feedback": Key(True, "Top-k: clients keep the unsent part (residual) and add it to their next update"),
        "randk-error-feedback": Key(False, "Rand-k: clients keep the unsent part (needs randk-scale = none)"),
        "randk-scale": Key(
            "unbiased", "Rand-k: multiply kept values by n/k (unbiased, Konečný et al.) or send them unscaled (none)",
            choices=RANDK_SCALES,
        ),
        "randk-index": Key(
            "seed", "Rand-k: positions regenerated from a seed in the payload (no index bytes) or sent through the sparse codec",
            choices=RANDK_INDEX,
        ),
        "quant-levels": Key(
            8, "FedPAQ: quantisation levels s of the QSGD quantiser (each coordinate takes ceil(log2(2s+1)) bits)",
            minimum=1, maximum=32767,
        ),
        "quant-bucket": Key(
            0, "FedPAQ: coordinates sharing one norm (0 = one float32 norm per quant-scope vector; QSGD used 512)", minimum=0
        ),
        "quant-scope": Key(
            "tensor", "FedPAQ: quantise each tensor with its own norm, or the whole update as one vector (model, the paper's Q(x))",
            choices=cc.QUANT_SCOPES,
        ),
    },
)


@cross_check
def _check_compression(cfg: Config) -> None:
    if cfg["strategy"] == "randk" and cfg["randk-error-feedback"] and cfg["randk-scale"] == "unbiased":
        raise ConfigError(
            "randk-error-feedback = true with randk-scale = 'unbiased': the residual of a scaled estimate "
            "grows without bound; allowed: randk-scale = 'none' with error feedback, or randk-error-feedback = false"
        )


def _weight(msg: Message, key: str) -> float:
    record = next(iter(msg.content.metric_records.values()))
    return float(record[key])


def _spec(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype.str) for k, v in arrays.items()}


class UplinkCompression(FedAvg):
    """FedAvg whose clients send compressed updates (see the module docstring).

    Parameters
    ----------
    method : "topk", "randk" or "fedpaq".
    ratio : k as a fraction of the entries (Top-k, Rand-k).
    topk_scope : "model" (one top-k over the whole update) or "tensor".
    error_feedback : clients keep a residual (default: True for Top-k, False otherwise).
    randk_scale : "unbiased" (×n/k) or "none"; randk_index : "seed" or "codec".
    levels, bucket : FedPAQ's s and the number of coordinates per norm (0 = one per quantised vector).
    quant_scope : "tensor" (one vector per tensor) or "model" (the whole update as one vector).
    **fedavg_kwargs : Flower FedAvg's sampling arguments.
    """

    def __init__(  # noqa: PLR0913 - one knob per paper setting
        self,
        method: str,
        *,
        ratio: float = 0.1,
        topk_scope: str = "model",
        error_feedback: bool | None = None,
        randk_scale: str = "unbiased",
        randk_index: str = "seed",
        levels: int = 8,
        bucket: int = 0,
        quant_scope: str = "tensor",
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if method not in cc.METHODS:
            raise ValueError(f"unknown compression method {method!r}; choose one of: {', '.join(cc.METHODS)}")
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1]; got {ratio!r}")
        if topk_scope not in TOPK_SCOPES:
            raise ValueError(f"unknown topk_scope {topk_scope!r}; choose one of: {', '.join(TOPK_SCOPES)}")
        if randk_scale not in RANDK_SCALES:
            raise ValueError(f"unknown randk_scale {randk_scale!r}; choose one of: {', '.join(RANDK_SCALES)}")
        if randk_index not in RANDK_INDEX:
            raise ValueError(f"unknown randk_index {randk_index!r}; choose one of: {', '.join(RANDK_INDEX)}")
        if quant_scope not in cc.QUANT_SCOPES:
            raise ValueError(f"unknown quant_scope {quant_scope!r}; choose one of: {', '.join(cc.QUANT_SCOPES)}")
        if int(levels) < 1 or int(bucket) < 0:
            raise ValueError(f"levels must be >= 1 and bucket >= 0; got levels={levels!r}, bucket={bucket!r}")
        self.method = method
        self.ratio = float(ratio)
        self.topk_scope = topk_scope
        self.error_feedback = (method == "topk") if error_feedback is None else bool(error_feedback)
        if method == "randk" and self.error_feedback and randk_scale == "unbiased":
            raise ValueError("Rand-k error feedback needs randk_scale='none' (the residual of a scaled estimate diverges)")
        self.randk_scale = randk_scale
        self.randk_index = randk_index
        self.levels = int(levels)
        self.bucket = int(bucket)
        self.quant_scope = quant_scope
        self._global: dict[str, np.ndarray] | None = None
        self._spec: dict[str, tuple[tuple[int, ...], str]] | None = None  # the model's arrays (round 1)
        self._omit: set[str] = set()  # arrays the clients were told to leave out (LUAR)
        self._round_info: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------ what clients are told
    def round_config(self) -> dict[str, Any]:
        """The compressor settings every train message carries."""
        out: dict[str, Any] = {cc.CFG_METHOD: self.method, cc.CFG_EF: self.error_feedback}
        if self.method in ("topk", "randk"):
            out[cc.CFG_RATIO] = self.ratio
        if self.method == "topk":
            out[cc.CFG_SCOPE] = self.topk_scope
        if self.method == "randk":
            out[cc.CFG_RANDK_SCALE] = self.randk_scale
            out[cc.CFG_RANDK_INDEX] = self.randk_index
        if self.method == "fedpaq":
            out[cc.CFG_LEVELS] = self.levels
            out[cc.CFG_BUCKET] = self.bucket
            out[cc.CFG_QSCOPE] = self.quant_scope
        return out

    # ------------------------------------------------------------------ Flower Strategy
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Dense downlink (as FedAvg), plus the compressor settings in the round's config."""
        self._global = {k: np.array(a.numpy(), copy=True) for k, a in arrays.items()}
        if self._spec is None:
            self._spec = _spec(self._global)
        self._omit = {str(k) for k in config.get(cc.LUAR_RECYCLED, [])}  # type: ignore[union-attr]
        round_config = ConfigRecord({**dict(config.items()), **self.round_config()})
        return super().configure_train(server_round, arrays, round_config, grid)

    def validate_reply(self, server_round: int, msg: Message) -> str | None:
        """fedsparse's reply screen: the payload decodes to the model's arrays (minus the omitted
        ones), with the model's shapes and dtypes, all finite."""
        records = msg.content.array_records
        if list(records) != [self.arrayrecord_key]:
            return f"expected exactly one ArrayRecord named {self.arrayrecord_key!r}, found {sorted(records)}"
        try:
            deltas, raws = cc.decode_update(codec.from_array_record(records[self.arrayrecord_key]))
        except (ValueError, KeyError, TypeError) as err:
            return f"the compressed update does not decode ({err})"
        spec = self._spec or (_spec(self._global) if self._global is not None else None)
        if spec is None:
            return None
        return check_arrays({**deltas, **raws}, spec, omit=self._omit)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every reply, average the updates (weighted by num-examples), apply them.

        Arrays that no reply carries (e.g. layers LUAR recycles) keep the global value.
        """
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self._global is None:
            raise AggregationError("aggregate_train called before configure_train: the round's global model is unknown")
        weights = [_weight(m, self.weighted_by_key) for m in valid]
        total = sum(weights)
        if not total > 0:
            raise AggregationError(f"replies' {self.weighted_by_key!r} sum to {total}; cannot weight the average")
        update_sum: dict[str, np.ndarray] = {}
        raw_sum: dict[str, np.ndarray] = {}
        raw_weight: dict[str, float] = {}
        nonzero = numel = 0
        for msg, w in zip(valid, weights):
            deltas, raws = cc.decode_update(codec.from_array_record(msg.content[self.arrayrecord_key]))
            nonzero += sum(int(np.count_nonzero(d)) for d in deltas.values())
            numel += sum(int(d.size) for d in deltas.values())
            for name, d in {**deltas, **raws}.items():
                if name not in self._global:
                    raise AggregationError(f"reply from node {msg.metadata.src_node_id} carries unknown array {name!r}")
                if tuple(np.shape(d)) != self._global[name].shape:
                    raise AggregationError(
                        f"reply from node {msg.metadata.src_node_id}: {name!r} has shape {np.shape(d)}, "
                        f"the model {self._global[name].shape}"
                    )
            for name, d in deltas.items():
                acc = update_sum.setdefault(name, np.zeros(d.shape, dtype=np.float64))
                acc += (w / total) * d.astype(np.float64)
            for name, v in raws.items():
                acc = raw_sum.setdefault(name, np.zeros(v.shape, dtype=np.float64))
                acc += w * v.astype(np.float64)
                raw_weight[name] = raw_weight.get(name, 0.0) + w
        new: dict[str, np.ndarray] = {}
        for name, x in self._global.items():
            if name in update_sum:
                new[name] = (x.astype(np.float64) + update_sum[name]).astype(x.dtype)
            elif name in raw_sum:
                mean = raw_sum[name] / raw_weight[name]
                new[name] = (np.rint(mean) if x.dtype.kind in "iub" else mean).astype(x.dtype)
            else:
                new[name] = x
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        # measured on the decoded updates: the fraction of the sent arrays' entries that are non-zero
        self._round_info[server_round] = {"uplink_nonzero_fraction": nonzero / numel if numel else math.nan}
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new.items()}), metrics

    def summary(self) -> None:
        super().summary()
        log.info("uplink compression: %s", self.round_config())

    # ------------------------------------------------------------------ fedsparse hooks
    def round_report(self, server_round: int) -> dict[str, Any]:
        """rounds.csv columns: the compressor, its k (or s and bits), and the fraction of non-zero
        entries in the decoded updates (Top-k / Rand-k: the kept fraction, measured)."""
        row: dict[str, Any] = {
            "compressor": self.method,
            "uplink_nonzero_fraction": self._round_info.get(server_round, {}).get("uplink_nonzero_fraction", math.nan),
        }
        if self.method in ("topk", "randk"):
            row["compress_ratio"] = self.ratio
        else:
            row["quant_levels"] = self.levels
            row["quant_bits"] = cc.code_bits(self.levels)
        return row

    def state_dict(self) -> dict[str, Any]:
        """The settings (the strategy keeps no state between rounds; residuals live on clients)."""
        return {"method": self.method, "config": self.round_config()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method") != self.method or dict(state.get("config", {})) != self.round_config():
            raise ValueError(
                f"state was saved with {state.get('method')!r} {state.get('config')}, this strategy is "
                f"{self.method!r} {self.round_config()}"
            )


# --------------------------------------------------------------------------------------------
# registry entries
# --------------------------------------------------------------------------------------------


def build_uplink(cfg: Mapping[str, Any], method: str) -> UplinkCompression:
    """An :class:`UplinkCompression` from the run configuration."""
    ef = {"topk": cfg["topk-error-feedback"], "randk": cfg["randk-error-feedback"], "fedpaq": False}[method]
    return UplinkCompression(
        method,
        ratio=float(cfg["compress-ratio"]),
        topk_scope=str(cfg["topk-scope"]),
        error_feedback=bool(ef),
        randk_scale=str(cfg["randk-scale"]),
        randk_index=str(cfg["randk-index"]),
        levels=int(cfg["quant-levels"]),
        bucket=int(cfg["quant-bucket"]),
        quant_scope=str(cfg["quant-scope"]),
        **sampling_kwargs(cfg),
    )


@register_strategy("topk", "Top-k uplink sparsification with client error feedback (Stich et al. 2018; Aji & Heafield 2017)")
def _topk(cfg: Mapping[str, Any]) -> Strategy:
    return build_uplink(cfg, "topk")


@register_strategy("randk", "Rand-k uplink subsampling, unbiased, seed-coded positions (Konečný et al. 2016)")
def _randk(cfg: Mapping[str, Any]) -> Strategy:
    return build_uplink(cfg, "randk")


@register_strategy("fedpaq", "FedPAQ (Reisizadeh et al. 2020): QSGD-quantised uplink updates (Alistarh et al. 2017)")
def _fedpaq(cfg: Mapping[str, Any]) -> Strategy:
    return build_uplink(cfg, "fedpaq")


# --------------------------------------------------------------------------------------------
# combinations (composition of existing strategies; nothing in them is changed)
# --------------------------------------------------------------------------------------------

COMBINATIONS = ("fedluar-paq", "feddip-luar")


@functools.lru_cache(maxsize=None)
def _luar_wrapper() -> type:
    """A LUAR subclass that also screens replies and reports through its base (built lazily so this
    module does not need FedLUAR to import)."""
    from strategies.fedluar import LUAR

    class LUARWith(LUAR):
        """:class:`strategies.fedluar.LUAR` whose base decodes compressed/sparse replies: the base's
        ``validate_reply`` screens them, and the base's round / final reports are merged into LUAR's.
        With ``mask_prunable`` the arrays it returns are multiplied by the base's pruning masks (FedDIP:
        a recycled layer moved by its previous update stays inside the current mask)."""

        mask_prunable = False

        def validate_reply(self, server_round: int, msg: Message) -> str | None:
            hook = getattr(self.base, "validate_reply", None)
            return hook(server_round, msg) if callable(hook) else None

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            new, metrics = super().aggregate_train(server_round, replies)
            masks = getattr(self.base, "masks", None) if self.mask_prunable else None
            if new is None or not masks:
                return new, metrics
            out = {}
            for k, a in new.items():
                x = a.numpy()
                if k in masks:
                    m = masks[k].numpy() if hasattr(masks[k], "numpy") else np.asarray(masks[k])
                    x = np.where(m, x, np.zeros((), x.dtype))
                out[k] = Array(np.ascontiguousarray(x))
            return ArrayRecord(out), metrics

        def round_report(self, server_round: int) -> dict[str, Any]:
            base = getattr(self.base, "round_report", None)
            return {**(base(server_round) if callable(base) else {}), **super().round_report(server_round)}

        def final_report(self, out_dir: Any) -> dict[str, Any]:
            base = getattr(self.base, "final_report", None)
            extra = base(out_dir) if callable(base) else None
            return {**(extra or {}), **super().final_report(out_dir)}

    return LUARWith


@functools.lru_cache(maxsize=None)
def _feddip_partial_uplink() -> type:
    """FedDIP whose aggregation accepts replies without LUAR's recycled tensors (built lazily)."""
    import copy

    from flwr.app import RecordDict

    from strategies.feddip import FedDIP

    class FedDIPPartialUplink(FedDIP):
        """FedDIP (unchanged) fed with complete replies: a tensor the round's clients left out (named
        in ``luar-recycled``) is filled in, before FedDIP aggregates, with the value the clients
        received — so FedDIP's aggregate leaves it where it was, and the LUAR wrapper then moves it by
        its recycled update. Only the server fills it in: nothing extra travels."""

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
            self._omit = [str(k) for k in config.get(cc.LUAR_RECYCLED, [])]  # type: ignore[union-attr]
            return super().configure_train(server_round, arrays, config, grid)

        def _complete(self, msg: Message) -> Message:
            omit = getattr(self, "_omit", [])
            if msg.has_error() or not omit or self._global is None:
                return msg
            tensors, masks = codec.decode(codec.from_array_record(msg.content[self.arrayrecord_key]))
            missing = [k for k in omit if k not in tensors]
            if not missing:
                return msg
            for k in missing:
                tensors[k] = self._global[k]
            keep = {k: (masks[k] if k in masks else self.masks[k].numpy()) for k in self.prunable if self.masks is not None}
            ordered = {k: tensors[k] for k in self._global}
            record = codec.to_array_record(codec.encode(ordered, {k: np.asarray(v, dtype=bool) for k, v in keep.items()}))
            content = RecordDict({name: (record if name == self.arrayrecord_key else rec) for name, rec in msg.content.items()})
            clone = copy.copy(msg)
            clone.content = content
            return clone

        def validate_reply(self, server_round: int, msg: Message) -> str | None:
            records = msg.content.array_records
            if list(records) != [self.arrayrecord_key]:
                return f"expected exactly one ArrayRecord named {self.arrayrecord_key!r}, found {sorted(records)}"
            try:
                tensors, kept = codec.decode(codec.from_array_record(records[self.arrayrecord_key]))
            except (ValueError, KeyError, TypeError, IndexError) as err:
                return f"the sparse model does not decode ({err})"
            if self._global is None:
                return None
            omit = getattr(self, "_omit", [])
            spec = {k: (x.shape, x.dtype.str) for k, x in self._global.items()}
            # FedDIP's own mask rule, for the prunable tensors the client did send
            return check_arrays(tensors, spec, omit=omit) or self.entries_outside_mask(server_round, kept)

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            return super().aggregate_train(server_round, [self._complete(m) for m in replies])

    return FedDIPPartialUplink


@cross_check
def _check_combinations(cfg: Config) -> None:
    name = cfg["strategy"]
    if name not in COMBINATIONS:
        return
    if cfg["persist-momentum"]:
        raise ConfigError(f"persist-momentum = true is not supported by {name} (only by fedluar); allowed: false")
    if cfg["luar-base"] != "fedavg":
        wrapped = "FedPAQ" if name == "fedluar-paq" else "FedDIP"
        raise ConfigError(f"luar-base = {cfg['luar-base']!r}: {name} wraps {wrapped}; allowed: 'fedavg' (ignored)")
    from strategies.fedluar import model_layers, parse_milestones

    if name == "feddip-luar":
        if parse_milestones(str(cfg["luar-lr-milestones"])):
            raise ConfigError("luar-lr-milestones is not used by feddip-luar (its clients follow FedDIP's lr schedule); allowed: ''")
        s0, sp = float(cfg["initial-sparsity"]), float(cfg["target-sparsity"])
        if not s0 <= sp < 1.0:
            raise ConfigError(f"initial-sparsity = {s0!r}, target-sparsity = {sp!r}; allowed: 0 <= initial-sparsity <= target-sparsity < 1")
    try:
        layers = model_layers(cfg)
    except ValueError:
        return
    if int(cfg["recycled-layers"]) > len(layers):
        raise ConfigError(
            f"recycled-layers = {cfg['recycled-layers']} exceeds the {len(layers)} recyclable layers of "
            f"{cfg['model']}; allowed: 0 .. {len(layers)}"
        )


@register_strategy(
    "fedluar-paq",
    "FedLUAR over FedPAQ (Kim et al. 2025, Table 4): recycled layers are not sent, the others QSGD-quantised",
)
def _fedluar_paq(cfg: Mapping[str, Any]) -> Strategy:
    from strategies.fedluar import luar_round_lr, model_layers, parse_milestones

    return _luar_wrapper()(
        build_uplink(cfg, "fedpaq"),
        int(cfg["recycled-layers"]),
        layers=model_layers(cfg),
        seed=int(cfg["seed"]),
        client_lr=(lambda t: luar_round_lr(cfg, t)) if parse_milestones(str(cfg["luar-lr-milestones"])) else None,
    )


@register_strategy(
    "feddip-luar",
    "FedDIP with a LUAR-recycled uplink: clients leave FedLUAR's recycled layers out of their sparse replies",
)
def _feddip_luar(cfg: Mapping[str, Any]) -> Strategy:
    from strategies.feddip import _feddip
    from strategies.fedluar import model_layers

    base = _feddip(cfg)  # FedDIP exactly as strategy = "feddip" builds it, from the same keys
    base.__class__ = _feddip_partial_uplink()  # + filling in the omitted tensors (no state of its own)
    wrapper = _luar_wrapper()(base, int(cfg["recycled-layers"]), layers=model_layers(cfg), seed=int(cfg["seed"]))
    wrapper.mask_prunable = True
    return wrapper


__all__ = ["UplinkCompression", "build_uplink", "COMBINATIONS"]
