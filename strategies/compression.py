"""Uplink-compression baselines as Flower strategies: Top-k with error feedback, Rand-k, FedPAQ, DGC, SBC, SmartIdx.

All of them keep FedAvg's round (sample clients, send the dense global model, average) and change
only the uplink: each client sends its **update** Δ_i = w_i − w_global compressed, the server decodes
every reply, averages the updates weighted by ``num-examples`` and applies the average,
w ← w + Σ_i ρ_i Δ̂_i (non-floating tensors, e.g. BN's ``num_batches_tracked``, are sent as values and
averaged like FedAvg does). The compressors and their payload formats are :mod:`fedsparse.compressors`.

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
* **DGC** — Lin et al., "Deep Gradient Compression" (ICLR 2018): Top-k of the client's accumulated
  velocity with momentum correction (``dgc-momentum``), local clipping (``dgc-clip-norm``), momentum
  factor masking (``dgc-momentum-masking``) and the exponential sparsity warm-up
  (``dgc-warmup-rounds``). The server sends each round's effective ratio and per-client clipping
  threshold in the round's config (:meth:`fedsparse.compressors.Compressor.for_round`), so clients
  run no schedule; each option switches off on its own, for ablations.
* **SBC** — Sattler et al., "Sparse Binary Compression" (2019): per tensor, the top-k positive or the
  top-k negative entries of the residual-corrected update, whichever has the larger mean magnitude,
  sent as positions (the sparse codec's index) plus that one mean; the rest stays in the residual.
* **SmartIdx** — Wu et al., "SmartIdx: Reducing Communication Cost in Federated Learning by
  Exploiting the CNNs Structures" (AAAI 2022): convolution kernels with enough important entries are
  sent whole behind one index (kernel package), kernels sharing a sign pattern share one sign set and
  one index set (pattern package), the other important entries go one by one (individual package);
  quantised values, Golomb–Rice indices, error feedback (:mod:`fedsparse.smartidx`). Its
  ``rounds.csv`` carries the round's uplink bytes by package and part (the appendix's Figure 4).

The strategies depend only on the messages (the round's config tells the clients which compressor to
run), so they work in ``Strategy.start`` in any Flower deployment whose ClientApp calls
:func:`fedsparse.compressors.compress_update`.

Combinations with FedLUAR are :mod:`strategies.combinations`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg

from fedsparse import codec
from fedsparse.compressors import DGC, QSGD, QUANT_SCOPES, SBC, Compressor, RandK, TopK, decode_update
from fedsparse.config import Config, ConfigError, Key
from fedsparse.hooks import MethodHooks
from fedsparse.methods import ErrorCase, Method, sampling_kwargs
from fedsparse.protocol import COMPRESSED_REPLY_METRICS, OMITTED_ARRAYS, single_array_record
from fedsparse.robust import AggregationRule
from fedsparse.smartidx import MAX_VALUE_BITS, SmartIdx
from fedsparse.validation import check_arrays

log = logging.getLogger("fedsparse")

TOPK_SCOPES = TopK.SCOPES
RANDK_SCALES = RandK.SCALES
RANDK_INDEX = RandK.INDEX

#: The compressors' configuration keys (the fedluar-paq combination declares them too, identically).
KEYS: dict[str, Key] = {
    "compress-ratio": Key(
        0.1,
        "Top-k / Rand-k: fraction k of the update's entries a client sends",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=1.0,
    ),
    "topk-scope": Key(
        "model",
        "Top-k: one selection over the whole update (model, as Stich et al.) or k per tensor",
        choices=TOPK_SCOPES,
    ),
    "topk-error-feedback": Key(True, "Top-k: clients keep the unsent part (residual) and add it to their next update"),
    "randk-error-feedback": Key(False, "Rand-k: clients keep the unsent part (needs randk-scale = none)"),
    "randk-scale": Key(
        "unbiased",
        "Rand-k: multiply kept values by n/k (unbiased, Konečný et al.) or send them unscaled (none)",
        choices=RANDK_SCALES,
    ),
    "randk-index": Key(
        "seed",
        "Rand-k: positions regenerated from a seed in the payload (no index bytes) or sent through the sparse codec",
        choices=RANDK_INDEX,
    ),
    "quant-levels": Key(
        8,
        "FedPAQ: quantisation levels s of the QSGD quantiser (each coordinate takes ceil(log2(2s+1)) bits)",
        minimum=1,
        maximum=32767,
    ),
    "quant-bucket": Key(
        0,
        "FedPAQ: coordinates sharing one norm (0 = one float32 norm per quant-scope vector; QSGD used 512)",
        minimum=0,
    ),
    "quant-scope": Key(
        "tensor",
        "FedPAQ: quantise each tensor with its own norm, or the whole update as one vector (model, the paper's Q(x))",
        choices=QUANT_SCOPES,
    ),
}


#: DGC's own keys (it reads ``compress-ratio`` from :data:`KEYS` too).
DGC_KEYS: dict[str, Key] = {
    "dgc-momentum": Key(
        0.9,
        "DGC: momentum m of the momentum correction (u <- m*u + update, v <- v + u, send top-k of v); "
        "0 = off (Top-k with error feedback); must be < 1",
        minimum=0.0,
        maximum=1.0,
    ),
    "dgc-clip-norm": Key(
        0.0,
        "DGC: local clipping; the L2 threshold on the round's averaged update: each of the round's N clients "
        "clips its update at dgc-clip-norm * sqrt(N) (the paper's N^-1/2 rule for an average); 0 = off",
        minimum=0.0,
    ),
    "dgc-momentum-masking": Key(True, "DGC: zero the momentum u where v was sent (momentum factor masking)"),
    "dgc-warmup-rounds": Key(
        4,
        "DGC: sparsity warm-up; round t <= W keeps compress-ratio^(t/(W+1)) of the entries (exponentially "
        "rising sparsity, the paper's 75/93.75/98.4/99.6 % for 0.1 % and W = 4), then compress-ratio; 0 = off",
        minimum=0,
    ),
    "dgc-scope": Key(
        "tensor",
        "DGC: top-k per tensor (tensor, the paper's per-layer selection) or over the whole update (model)",
        choices=TOPK_SCOPES,
    ),
}

#: SBC's own keys (it reads ``compress-ratio`` from :data:`KEYS` too).
SBC_KEYS: dict[str, Key] = {
    "sbc-error-feedback": Key(
        True, "SBC: clients keep the unsent part (residual) and add it to their next update (the paper does)"
    ),
}


#: SmartIdx's own keys (it reads ``compress-ratio`` from :data:`KEYS` too: the fraction of each
#: tensor's entries judged important).
SMARTIDX_KEYS: dict[str, Key] = {
    "smartidx-kernel-threshold": Key(
        0.5,
        "SmartIdx: a convolution kernel is sent whole when at least ceil(threshold * kh*kw) of its entries are "
        "among the tensor's top compress-ratio entries (important)",
        minimum=0.0,
        exclusive_minimum=True,
        maximum=1.0,
    ),
    "smartidx-pattern-min": Key(
        2,
        "SmartIdx: selected kernels of a tensor that must share a sign pattern to form a pattern package "
        "(one sign set and one index set for all of them); rarer patterns go to the kernel package",
        minimum=2,
    ),
    "smartidx-value-bits": Key(
        0,
        "SmartIdx: bits per sent magnitude; 0 = one mean magnitude per package and tensor (binary, signs only), "
        f"1..{MAX_VALUE_BITS} = uniform levels up to the package's largest magnitude",
        minimum=0,
        maximum=MAX_VALUE_BITS,
    ),
    "smartidx-error-feedback": Key(
        True, "SmartIdx: clients keep the unsent part (residual) and add it to their next update"
    ),
}


def check_dgc(cfg: Config) -> None:
    """DGC's momentum must decay."""
    m = float(cfg["dgc-momentum"])
    if not m < 1.0:
        raise ConfigError(
            f"dgc-momentum = {m!r}: the velocity u would never decay and v grows without bound; allowed: 0 <= dgc-momentum < 1"
        )


def check_randk(cfg: Config) -> None:
    """Rand-k's error feedback only on unscaled values."""
    if cfg["randk-error-feedback"] and cfg["randk-scale"] == "unbiased":
        raise ConfigError(
            "randk-error-feedback = true with randk-scale = 'unbiased': the residual of a scaled estimate "
            "grows without bound; allowed: randk-scale = 'none' with error feedback, or randk-error-feedback = false"
        )


def _weight(msg: Message, key: str) -> float:
    record = next(iter(msg.content.metric_records.values()))
    return float(record[key])


def _spec(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype.str) for k, v in arrays.items()}


class UplinkCompression(FedAvg, MethodHooks):
    """FedAvg whose clients send compressed updates (see the module docstring).

    Parameters
    ----------
    compressor : a :class:`fedsparse.compressors.Compressor` (TopK, RandK, QSGD, ...), or the name of
        one ("topk", "randk", "fedpaq") built from the keyword settings below.
    ratio : k as a fraction of the entries (Top-k, Rand-k).
    topk_scope : "model" (one top-k over the whole update) or "tensor".
    error_feedback : clients keep a residual (default: True for Top-k, False otherwise).
    randk_scale : "unbiased" (×n/k) or "none"; randk_index : "seed" or "codec".
    levels, bucket : FedPAQ's s and the number of coordinates per norm (0 = one per quantised vector).
    quant_scope : "tensor" (one vector per tensor) or "model" (the whole update as one vector).
    **fedavg_kwargs : Flower FedAvg's sampling arguments.

    Arrays the round's clients were told to leave out (:data:`fedsparse.protocol.OMITTED_ARRAYS`,
    written by a FedLUAR wrapper) may be missing from replies; they keep the global value.
    """

    def __init__(  # noqa: PLR0913 - one knob per paper setting
        self,
        compressor: Compressor | str,
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
        if isinstance(compressor, str):
            compressor = named_compressor(
                compressor,
                ratio=ratio,
                topk_scope=topk_scope,
                error_feedback=error_feedback,
                randk_scale=randk_scale,
                randk_index=randk_index,
                levels=levels,
                bucket=bucket,
                quant_scope=quant_scope,
            )
        self.compressor = compressor
        self._global: dict[str, np.ndarray] | None = None
        self._spec: dict[str, tuple[tuple[int, ...], str]] | None = None  # the model's arrays (round 1)
        self._omit: set[str] = set()  # arrays the clients were told to leave out (LUAR)
        self._round_info: dict[int, dict[str, Any]] = {}
        self._round_report: dict[int, dict[str, Any]] = {}  # the round's compressor settings
        self.aggregation: AggregationRule | None = None  # None: the weighted mean (use_aggregation)

    @property
    def method(self) -> str:
        """The compressor's name (what clients see in ``compress-method``)."""
        return self.compressor.name

    @property
    def error_feedback(self) -> bool:
        return self.compressor.error_feedback

    def round_config(self) -> dict[str, Any]:
        """The compressor settings every train message carries."""
        return self.compressor.round_config()

    # ------------------------------------------------------------------ Flower Strategy
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Dense downlink (as FedAvg), plus the compressor settings in the round's config."""
        self._global = {k: np.array(a.numpy(), copy=True) for k, a in arrays.items()}
        if self._spec is None:
            self._spec = _spec(self._global)
        self._omit = {str(k) for k in config.get(OMITTED_ARRAYS, [])}  # type: ignore[union-attr]  # a list entry
        round_config = ConfigRecord({**dict(config.items()), **self.round_config()})
        messages = list(super().configure_train(server_round, arrays, round_config, grid))
        # the round's compressor, once the clients are sampled (DGC: warm-up ratio, clipping threshold)
        compressor = self.compressor.for_round(server_round, len(messages))
        if compressor is not self.compressor:
            settings = compressor.round_config()
            for msg in messages:  # FedAvg's messages share one config record; updating it twice is harmless
                msg.content[self.configrecord_key].update(settings)  # type: ignore[union-attr]  # a ConfigRecord
        self._round_report[server_round] = compressor.report()
        return messages

    def validate_reply(self, server_round: int, msg: Message) -> str | None:
        """fedsparse's reply screen: the payload decodes to the model's arrays (minus the omitted
        ones), with the model's shapes and dtypes, all finite."""
        record = single_array_record(msg, self.arrayrecord_key)
        if isinstance(record, str):
            return record
        try:
            deltas, raws = decode_update(codec.from_array_record(record))
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
        payload_sums: dict[str, float] = {}
        for msg, w in zip(valid, weights):
            payload = codec.from_array_record(msg.content[self.arrayrecord_key])
            deltas, raws = decode_update(payload)
            for key, value in self.compressor.payload_report(payload).items():
                payload_sums[key] = payload_sums.get(key, 0.0) + value
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
        if self.aggregation is not None:
            update_sum, raw_sum = self._robust_update(valid, weights), {}
        new: dict[str, np.ndarray] = {}
        for name, x in self._global.items():
            if name in update_sum:
                moved = x.astype(np.float64) + update_sum[name]
                new[name] = (np.rint(moved) if x.dtype.kind in "iub" else moved).astype(x.dtype)
            elif name in raw_sum:
                mean = raw_sum[name] / raw_weight[name]
                new[name] = (np.rint(mean) if x.dtype.kind in "iub" else mean).astype(x.dtype)
            else:
                new[name] = x
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        # measured on the decoded updates: the fraction of the sent arrays' entries that are non-zero
        self._round_info[server_round] = {
            "uplink_nonzero_fraction": nonzero / numel if numel else math.nan,
            **payload_sums,  # the compressor's per-payload figures, summed over the round's replies
        }
        return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in new.items()}), metrics

    def use_aggregation(self, rule: AggregationRule) -> UplinkCompression:
        """Combine the decoded updates with ``rule`` (:mod:`fedsparse.robust`) in place of the
        weighted mean: a median over FedPAQ is a median of the dequantised updates, never of codes."""
        self.aggregation = None if rule.is_plain_mean else rule
        return self

    def _robust_update(self, valid: list[Message], weights: list[float]) -> dict[str, np.ndarray]:
        """The rule's combination of the replies' dense updates: the decoded Δ of the compressed
        tensors, and value − global for the arrays sent as they are (integer buffers, ...)."""
        assert self._global is not None and self.aggregation is not None
        updates = []
        for msg in valid:
            deltas, raws = decode_update(codec.from_array_record(msg.content[self.arrayrecord_key]))
            dense = {name: d.astype(np.float64) for name, d in deltas.items()}
            dense.update(
                {name: v.astype(np.float64) - self._global[name].astype(np.float64) for name, v in raws.items()}
            )
            updates.append(dense)
        return self.aggregation.combine_updates(updates, weights)

    def summary(self) -> None:
        super().summary()
        log.info("uplink compression: %s", self.round_config())

    # ------------------------------------------------------------------ fedsparse hooks
    def round_report(self, server_round: int) -> dict[str, Any]:
        """rounds.csv columns: the compressor, its k (or s and bits; DGC: the round's k and clipping
        threshold), the fraction of non-zero entries in the decoded updates (Top-k / Rand-k: the
        kept fraction, measured), and the compressor's figures measured on the round's payloads
        (:meth:`~fedsparse.compressors.Compressor.payload_report`, summed over the replies)."""
        info = self._round_info.get(server_round, {})
        return {
            "compressor": self.method,
            "uplink_nonzero_fraction": info.get("uplink_nonzero_fraction", math.nan),
            **self._round_report.get(server_round, self.compressor.report()),
            **{k: v for k, v in info.items() if k != "uplink_nonzero_fraction"},
        }

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


def named_compressor(
    name: str,
    *,
    ratio: float = 0.1,
    topk_scope: str = "model",
    error_feedback: bool | None = None,
    randk_scale: str = "unbiased",
    randk_index: str = "seed",
    levels: int = 8,
    bucket: int = 0,
    quant_scope: str = "tensor",
) -> Compressor:
    """The compressor called ``name`` with the settings it takes (the others are ignored);
    error feedback defaults to on for Top-k and SBC. DGC gets its paper defaults (momentum 0.9 with
    masking, per-tensor selection, no clipping or warm-up): pass a :class:`DGC` for other settings."""
    ef = (name in ("topk", "sbc", "smartidx")) if error_feedback is None else bool(error_feedback)
    if name == DGC.name:
        return DGC(ratio)
    if name == SBC.name:
        return SBC(ratio, error_feedback=ef)
    if name == SmartIdx.name:
        return SmartIdx(ratio, error_feedback=ef)
    if name == TopK.name:
        return TopK(ratio, topk_scope, error_feedback=ef)
    if name == RandK.name:
        return RandK(ratio, randk_scale, randk_index, error_feedback=ef)
    if name == QSGD.name:
        return QSGD(levels, bucket, quant_scope, error_feedback=ef)
    raise ValueError(f"unknown compression method {name!r}; choose one of: topk, randk, fedpaq, dgc, sbc, smartidx")


def compressor_for(cfg: Mapping[str, Any], name: str) -> Compressor:
    """The compressor ``name`` with the run configuration's settings."""
    if name == DGC.name:
        return DGC(
            float(cfg["compress-ratio"]),
            str(cfg["dgc-scope"]),
            momentum=float(cfg["dgc-momentum"]),
            momentum_masking=bool(cfg["dgc-momentum-masking"]),
            clip_norm=float(cfg["dgc-clip-norm"]),
            warmup_rounds=int(cfg["dgc-warmup-rounds"]),
        )
    if name == SBC.name:
        return SBC(float(cfg["compress-ratio"]), error_feedback=bool(cfg["sbc-error-feedback"]))
    if name == SmartIdx.name:
        return SmartIdx(
            float(cfg["compress-ratio"]),
            kernel_threshold=float(cfg["smartidx-kernel-threshold"]),
            pattern_min=int(cfg["smartidx-pattern-min"]),
            value_bits=int(cfg["smartidx-value-bits"]),
            error_feedback=bool(cfg["smartidx-error-feedback"]),
        )
    ef = {"topk": cfg["topk-error-feedback"], "randk": cfg["randk-error-feedback"], "fedpaq": False}[name]
    return named_compressor(
        name,
        ratio=float(cfg["compress-ratio"]),
        topk_scope=str(cfg["topk-scope"]),
        error_feedback=bool(ef),
        randk_scale=str(cfg["randk-scale"]),
        randk_index=str(cfg["randk-index"]),
        levels=int(cfg["quant-levels"]),
        bucket=int(cfg["quant-bucket"]),
        quant_scope=str(cfg["quant-scope"]),
    )


def build_uplink(cfg: Mapping[str, Any], method: str) -> UplinkCompression:
    """An :class:`UplinkCompression` from the run configuration."""
    return UplinkCompression(compressor_for(cfg, method), **sampling_kwargs(cfg))


def _declare(
    name: str,
    summary: str,
    checks: tuple[Any, ...] = (),
    error_cases: tuple[ErrorCase, ...] = (),
    keys: Mapping[str, Key] | None = None,
) -> Method:
    return Method(
        name=name,
        summary=summary,
        build=lambda cfg: build_uplink(cfg, name),
        client_step="clients.compression:compressed_train",
        keys={**KEYS, **(keys or {})},
        section="compression",
        reply_metrics=COMPRESSED_REPLY_METRICS,
        checks=checks,
        error_cases=error_cases,
    )


TOPK = _declare(
    "topk", "Top-k uplink sparsification with client error feedback (Stich et al. 2018; Aji & Heafield 2017)"
)
RANDK = _declare(
    "randk",
    "Rand-k uplink subsampling, unbiased, seed-coded positions (Konečný et al. 2016)",
    checks=(check_randk,),
    error_cases=(ErrorCase("Rand-k: error feedback on the unbiased estimate", {"randk-error-feedback": True}),),
)
FEDPAQ = _declare("fedpaq", "FedPAQ (Reisizadeh et al. 2020): QSGD-quantised uplink updates (Alistarh et al. 2017)")
DGC_METHOD = _declare(
    "dgc",
    "Deep Gradient Compression (Lin et al. 2018): top-k with momentum correction, local clipping, "
    "momentum factor masking and sparsity warm-up",
    checks=(check_dgc,),
    error_cases=(ErrorCase("DGC: momentum that never decays", {"dgc-momentum": 1.0}),),
    keys=DGC_KEYS,
)
SBC_METHOD = _declare(
    "sbc",
    "Sparse Binary Compression (Sattler et al. 2019): per tensor the positions of the top-k positive or "
    "negative entries and their mean, with error feedback",
    keys=SBC_KEYS,
)
SMARTIDX_METHOD = _declare(
    "smartidx",
    "SmartIdx (Wu et al. 2022): convolution-kernel-based selection in individual, kernel and pattern "
    "packages, quantised values, Golomb-coded indices, error feedback",
    error_cases=(
        ErrorCase("SmartIdx: more value bits than the format holds", {"smartidx-value-bits": 9}),
        ErrorCase("SmartIdx: a pattern package of one kernel", {"smartidx-pattern-min": 1}),
        ErrorCase("SmartIdx: kernel threshold of zero", {"smartidx-kernel-threshold": 0.0}),
    ),
    keys=SMARTIDX_KEYS,
)

__all__ = [
    "UplinkCompression",
    "build_uplink",
    "compressor_for",
    "named_compressor",
    "KEYS",
    "DGC_KEYS",
    "SBC_KEYS",
    "SMARTIDX_KEYS",
    "TOPK",
    "RANDK",
    "FEDPAQ",
    "DGC_METHOD",
    "SBC_METHOD",
    "SMARTIDX_METHOD",
]
