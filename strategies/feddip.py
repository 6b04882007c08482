"""FedDIP (Long et al., 2023) as a Flower strategy: federated dynamic pruning with error feedback and
incremental regularisation, with a sparse downlink (and a sparse uplink when masks are nested).

Algorithm 1 of the paper, on the server:

* round 1 (``s_0 > 0``): draw the initial mask m_0 from the ERK distribution at sparsity s_0, from the
  run's seed (line 3), and send w_0 ⊙ m_0;
* every round τ = 1..T: send the pruned global model ω_G^(τ−1) through :mod:`fedsparse.codec` (kept
  values + bitmap/coordinate index for the prunable tensors, everything else dense) together with λ
  of eq. 9 at the 0-based round index t = τ − 1 (so λ = 0 for exactly the first T/Q rounds) and the
  names of the prunable tensors; the clients take their mask from the positions the
  codec kept (line 10), train with :func:`clients.feddip_step.feddip_train` and reply;
* aggregate (eq. 12, weighted by ``num-examples``); when τ mod R = 0 re-prune by **global** magnitude
  at s_τ (eq. 11, line 21) — and always at the schedule's last round T, so the returned model has
  exactly s_p; multiply the aggregate by the mask (line 23).

Nested masks (default, ``regrowth=False``, as in the authors' code): clients send only the entries
of the current mask (sparse uplink through the codec), the aggregate is masked with the old mask
before re-pruning, so every new mask is a subset of the previous one. ``regrowth=True`` (DPF's
spirit): in the rounds whose aggregate is re-pruned (:meth:`FedDIP.reconfigures_at`) clients send
their dense prunable tensors and the server prunes the dense aggregate, so pruned weights can come
back; in every other round the aggregate is multiplied by the unchanged mask, so the pruned entries
of a dense reply would be discarded — those rounds ask for the sparse uplink, as nested masks do.

The arrays ``aggregate_train`` returns are a plain dense ``ArrayRecord`` of the pruned model (what
central evaluation and ``Strategy.start`` expect); only what goes on the wire is codec-encoded. The
strategy needs nothing from fedsparse's loop, so it works with ``Strategy.start`` in any Flower
deployment whose ClientApp runs :func:`clients.feddip.feddip_client_round`.

Variants by configuration: FedDP (``lambda-max = 0``), DPF in FL (``initial-sparsity = 0``,
``lambda-max = 0``, ``regrowth = true`` — with nested masks no pruned weight can come back, and the
dense values that error feedback gives pruned weights never reach the server), FedDIP+Prox
(``feddip-prox = true``: clients add μ/2‖w − w_G‖² at the dense local w, μ = ``proximal-mu``).
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsparse import codec
from fedsparse.aggregation import weighted_mean
from fedsparse.checkpoint import atomic_write
from fedsparse.config import Config, ConfigError, Key
from fedsparse.hooks import MethodHooks
from fedsparse.masks import erk_densities, erk_masks, global_magnitude_masks, magnitude_erk_masks, prunable_names
from fedsparse.methods import ErrorCase, Method, sampling_kwargs
from fedsparse.protocol import OMITTED_ARRAYS, single_array_record
from fedsparse.protocol.feddip import (
    CONFIG_LAMBDA,
    CONFIG_PROXIMAL_MU,
    CONFIG_PRUNABLE,
    CONFIG_SPARSE_UPLINK,
    METRIC_REG_RATIO,
    REPLY_METRICS,
    decode_payload,
)
from fedsparse.robust import AggregationRule
from fedsparse.schedules import cubic_sparsity, incremental_lambda
from fedsparse.validation import check_arrays

__all__ = ["FedDIP", "METHOD", "KEYS", "INITIAL_MASKS", "check_sparsities", "check_dense_rounds", "build_feddip"]

#: How the initial mask m_0 picks positions inside ERK's per-layer budgets (docs/feddip.md).
INITIAL_MASKS = ("magnitude-erk", "random-erk")

#: What happens to pruned weights (docs/feddip.md, "Regrowth"); TOML's true/false are accepted too.
REGROWTH_MODES = ("false", "true", "persistent")

#: FedDIP's configuration keys (shared by feddip-luar, which builds FedDIP from the same keys).
KEYS: dict[str, Key] = {
    "initial-sparsity": Key(
        0.5, "FedDIP s_0: sparsity of the initial ERK mask (0 = start dense, DPF)", minimum=0.0, maximum=1.0
    ),
    "target-sparsity": Key(
        0.9, "FedDIP s_p: sparsity of the returned model (prunable weights)", minimum=0.0, maximum=1.0
    ),
    "reconfig-every": Key(5, "FedDIP R: re-prune the global mask every R rounds", minimum=1),
    "lambda-max": Key(1e-3, "FedDIP λ_max of the incremental regularisation (0 = FedDP)", minimum=0.0),
    "lambda-steps": Key(10, "FedDIP Q: number of λ steps over the schedule (eq. 9)", minimum=1),
    "regrowth": Key(
        "false",
        "FedDIP: false = nested masks, sparse uplink; true = re-prune the dense aggregate (dense uplink in re-pruning rounds); persistent = the server keeps the pruned weights' values across rounds (dense uplink every round)",
        choices=REGROWTH_MODES,
    ),
    "feddip-prox": Key(False, "FedDIP+Prox: clients add FedProx's term with mu = proximal-mu"),
    "feddip-schedule-rounds": Key(0, "FedDIP T of the sparsity and λ schedules (0 = rounds)", minimum=0),
    "initial-mask": Key(
        "magnitude-erk",
        "FedDIP m_0 within ERK's per-layer budgets: magnitude-erk = largest |w| of the model after dense-rounds, random-erk = a seeded random draw",
        choices=INITIAL_MASKS,
    ),
    "dense-rounds": Key(
        1,
        "FedDIP: rounds trained dense before the initial mask is applied (the authors' code: 1; 0 = mask the untrained model)",
        minimum=0,
    ),
}


def check_sparsities(cfg: Config) -> None:
    """s_0 ≤ s_p < 1 (a model with every weight pruned cannot learn)."""
    s0, sp = float(cfg["initial-sparsity"]), float(cfg["target-sparsity"])
    if not sp < 1.0:
        raise ConfigError(f"target-sparsity = {sp!r} prunes every weight; allowed: initial-sparsity .. < 1")
    if s0 > sp:
        raise ConfigError(
            f"initial-sparsity = {s0!r} exceeds target-sparsity = {sp!r}; allowed: 0 <= initial-sparsity <= target-sparsity"
        )


def check_dense_rounds(cfg: Config) -> None:
    """The initial mask must come before the schedule's last round, which must reach s_p."""
    dense = int(cfg["dense-rounds"])
    total = int(cfg["feddip-schedule-rounds"]) or int(cfg["rounds"])
    if dense >= total:
        raise ConfigError(
            f"dense-rounds = {dense} leaves no pruned round in a schedule of T = {total} rounds; allowed: 0 .. {total - 1}"
        )


def _mask_seed(seed: int) -> int:
    """The ERK draw's seed: a function of the run's seed, distinct from the model's init seed."""
    return zlib.crc32(f"feddip-erk/{int(seed)}".encode())


class FedDIP(FedAvg, MethodHooks):
    """FedDIP's server side (see the module docstring).

    Parameters
    ----------
    total_rounds : int
        T of the schedules (eq. 9 and 11). The mask is re-pruned to exactly ``target_sparsity`` at
        round T; keep T equal to the number of rounds you run.
    initial_sparsity, target_sparsity : float
        s_0 and s_p, 0 ≤ s_0 ≤ s_p < 1, over the prunable tensors pooled.
    reconfig_every : int
        R: re-prune every R rounds.
    lambda_max : float, lambda_steps : int
        λ_max and Q of eq. 9 (λ_max = 0 gives FedDP).
    regrowth : bool or str
        ``False``/``"false"`` (default): nested masks, sparse uplink. ``True``/``"true"``: pruned
        weights may return; the uplink is dense in re-pruning rounds and sparse in the others
        (:meth:`sparse_uplink_at`). ``"persistent"``: the server keeps a dense copy whose pruned
        positions accumulate the clients' error-feedback changes round after round (DPF's dense
        weights, held by the server because sampled clients hold no state); the uplink is dense in
        every round, and counted so.
    proximal_mu : float
        > 0 makes clients add FedProx's proximal term (FedDIP+Prox); sent as ``proximal-mu``.
    seed : int
        Seeds the ERK draw of the initial mask (``initial_mask = "random-erk"``).
    initial_mask : str
        How m_0 fills each layer's ERK budget: ``"magnitude-erk"`` keeps the largest |w| of the
        model after ``dense_rounds`` rounds (of the initial weights when 0), ``"random-erk"`` draws
        the positions at random from ``seed``.
    dense_rounds : int
        Rounds 1..D are trained dense (mask all ones, dense messages); m_0 is computed from the
        aggregate of round D and applied to it. 0: m_0 masks the model sent in round 1.
    exclude_shortcuts : bool
        Keep ResNet 1×1 shortcut convolutions dense (see :func:`fedsparse.masks.prunable_names`).
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling fractions, keys, ...).

    Under a wrapper that tells clients to leave arrays out of their replies (FedLUAR writes
    :data:`fedsparse.protocol.OMITTED_ARRAYS` into the round's config), FedDIP accepts replies
    without those arrays and fills them in, before aggregating, with the value the clients
    received: its aggregate leaves them where they were, and the wrapper moves them. Only the
    server fills them in: nothing extra travels.
    """

    def __init__(  # noqa: PLR0913 - the paper's hyper-parameters
        self,
        total_rounds: int,
        initial_sparsity: float = 0.5,
        target_sparsity: float = 0.9,
        reconfig_every: int = 5,
        lambda_max: float = 1e-3,
        lambda_steps: int = 10,
        regrowth: bool | str = False,
        proximal_mu: float = 0.0,
        seed: int = 0,
        exclude_shortcuts: bool = True,
        initial_mask: str = "magnitude-erk",
        dense_rounds: int = 1,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        # Validate through the schedule functions (they raise clear ValueErrors).
        cubic_sparsity(0, total_rounds, initial_sparsity, target_sparsity)
        incremental_lambda(0, total_rounds, lambda_max, lambda_steps)
        if isinstance(reconfig_every, bool) or int(reconfig_every) != reconfig_every or reconfig_every < 1:
            raise ValueError(f"reconfig_every (R) must be an integer >= 1; got {reconfig_every!r}")
        if not float(proximal_mu) >= 0:
            raise ValueError(f"proximal_mu must be >= 0; got {proximal_mu!r}")
        mode = str(regrowth).lower()
        if mode not in REGROWTH_MODES:
            raise ValueError(f"regrowth = {regrowth!r}; choose one of: {', '.join(REGROWTH_MODES)}")
        if initial_mask not in INITIAL_MASKS:
            raise ValueError(f"initial_mask = {initial_mask!r}; choose one of: {', '.join(INITIAL_MASKS)}")
        if isinstance(dense_rounds, bool) or int(dense_rounds) != dense_rounds or not 0 <= dense_rounds < total_rounds:
            raise ValueError(f"dense_rounds must be an integer in [0, {int(total_rounds) - 1}]; got {dense_rounds!r}")
        self.total_rounds = int(total_rounds)
        self.initial_sparsity = float(initial_sparsity)
        self.target_sparsity = float(target_sparsity)
        self.reconfig_every = int(reconfig_every)
        self.lambda_max = float(lambda_max)
        self.lambda_steps = int(lambda_steps)
        #: "false" (nested), "true" (re-prune the dense aggregate) or "persistent"
        self.regrowth = mode
        self.proximal_mu = float(proximal_mu)
        self.seed = int(seed)
        self.exclude_shortcuts = bool(exclude_shortcuts)
        self.initial_mask = str(initial_mask)
        self.dense_rounds = int(dense_rounds)

        # --- state (see state_dict) ---
        self.masks: dict[str, torch.Tensor] | None = None  # current global mask m (True = kept)
        self.prunable: list[str] = []
        self.initial_densities: dict[str, float] = {}  # ERK densities of m_0 (for the report)
        self.last_reconfig_round = 0
        self.reconfig_rounds: list[int] = []
        self._round_info: dict[int, dict[str, Any]] = {}
        self._global: dict[str, np.ndarray] | None = None  # the masked model last sent
        # regrowth = persistent: the dense prunable tensors, pruned positions included
        self._dense: dict[str, np.ndarray] | None = None
        self._omit: list[str] = []  # arrays the round's clients leave out (a wrapper's OMITTED_ARRAYS)
        self.aggregation: AggregationRule | None = None  # None: the weighted mean (use_aggregation)

    # ------------------------------------------------------------------ schedules
    def lambda_at(self, server_round: int) -> float:
        """λ for round τ = ``server_round`` (1-based): eq. 9 at the 0-based round index t = τ − 1.

        Eq. 9's intervals (i − 1)T/Q ≤ t < iT/Q start at t = 0, so round τ = 1 is t = 0: λ = 0 for
        exactly the first T/Q rounds (τ ≤ T/Q when Q divides T), λ_max/Q from τ = T/Q + 1, and the
        last step λ_max(Q − 1)/Q for τ > (Q − 1)T/Q.
        """
        return incremental_lambda(server_round - 1, self.total_rounds, self.lambda_max, self.lambda_steps)

    def sparsity_at(self, server_round: int) -> float:
        """s_τ of eq. 11 (exactly s_p for τ ≥ T)."""
        return cubic_sparsity(server_round, self.total_rounds, self.initial_sparsity, self.target_sparsity)

    def reconfigures_at(self, server_round: int) -> bool:
        """Whether the mask changes after aggregating round τ: the initial mask at τ = D (dense
        rounds), then τ mod R = 0, or τ = T; never during the dense rounds τ < D."""
        if server_round < self.dense_rounds:
            return False
        return (
            server_round == self.dense_rounds
            or server_round % self.reconfig_every == 0
            or server_round == self.total_rounds
        )

    def sparse_uplink_at(self, server_round: int) -> bool:
        """Whether round τ's replies carry only the entries of the round's mask.

        Always with nested masks; with ``regrowth = true`` in every round except the re-pruning ones
        (only they rank the dense aggregate — in the others it is multiplied by the unchanged mask,
        so dense values at pruned positions would be sent for nothing); never with ``persistent``
        (every round's values at pruned positions are kept by the server).
        """
        if self.regrowth == "persistent":
            return False
        return not (self.regrowth == "true" and self.reconfigures_at(server_round))

    # ------------------------------------------------------------------ masks
    def _init_masks(self, arrays: ArrayRecord) -> None:
        state = arrays.to_torch_state_dict()
        self.prunable = prunable_names(state, exclude_shortcuts=self.exclude_shortcuts)
        if not self.prunable:
            raise ValueError("FedDIP found no prunable tensors (conv/linear weights with ndim > 1) in the model")
        shapes = {n: tuple(state[n].shape) for n in self.prunable}
        self.initial_densities = erk_densities(shapes, 1.0 - self.initial_sparsity)
        if self.dense_rounds > 0:
            self.masks = {n: torch.ones(shape, dtype=torch.bool) for n, shape in shapes.items()}
        else:
            self.masks = self._initial_masks({n: state[n] for n in self.prunable})

    def _initial_masks(self, prunable: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """m_0 at sparsity s_0: ERK's per-layer budgets, filled by magnitude or at random."""
        if self.initial_mask == "magnitude-erk":
            return magnitude_erk_masks(prunable, self.initial_sparsity)
        shapes = {n: tuple(t.shape) for n, t in prunable.items()}
        gen = torch.Generator().manual_seed(_mask_seed(self.seed))
        return erk_masks(shapes, self.initial_sparsity, gen)

    def _masked(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.masks is not None
        out = {}
        for name, x in tensors.items():
            if name in self.masks:
                x = np.where(self.masks[name].numpy(), x, np.zeros((), dtype=x.dtype))
            out[name] = np.asarray(x, order="C")  # keeps 0-d arrays 0-d (BN counters)
        return out

    def measured_sparsity(self, tensors: Mapping[str, np.ndarray] | None = None) -> float:
        """Fraction of exact zeros over the prunable tensors of ``tensors`` (default: the global model)."""
        tensors = self._global if tensors is None else tensors
        if tensors is None or not self.prunable:
            return math.nan
        zeros = sum(int(np.count_nonzero(tensors[n] == 0)) for n in self.prunable)
        return zeros / sum(tensors[n].size for n in self.prunable)

    def per_layer_sparsity(self) -> dict[str, float]:
        """Measured sparsity of each prunable tensor of the global model."""
        if self._global is None:
            return {}
        return {n: float(np.count_nonzero(self._global[n] == 0)) / self._global[n].size for n in self.prunable}

    # ------------------------------------------------------------------ Flower Strategy
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the pruned global model (codec-encoded) with λ_τ; draw m_0 on the first call."""
        if self.masks is None:
            self._init_masks(arrays)
        assert self.masks is not None
        self._omit = [str(k) for k in config.get(OMITTED_ARRAYS, [])]  # type: ignore[union-attr]  # a list entry
        dense = {name: arr.numpy() for name, arr in arrays.items()}
        missing = [n for n in self.prunable if n not in dense]
        if missing:
            raise ValueError(f"the global model lacks the prunable tensors {missing}")
        if self.regrowth == "persistent" and self._dense is None:
            self._dense = {n: np.array(dense[n], copy=True) for n in self.prunable}
        self._global = self._masked(dense)
        encoded = codec.encode(self._global, {n: self.masks[n].numpy() for n in self.prunable})
        lam = self.lambda_at(server_round)
        config = ConfigRecord(dict(config))  # Strategy.start reuses one config object: never mutate it
        config[CONFIG_LAMBDA] = lam
        config[CONFIG_PRUNABLE] = list(self.prunable)
        config[CONFIG_SPARSE_UPLINK] = self.sparse_uplink_at(server_round)
        if self.proximal_mu > 0:
            config[CONFIG_PROXIMAL_MU] = self.proximal_mu
        self._round_info[server_round] = {
            "lambda": lam,
            "target_sparsity": self.sparsity_at(server_round),
            "reconfigured": False,
            "sparsity": self.measured_sparsity(),
        }
        return super().configure_train(server_round, codec.to_array_record(encoded), config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode, average, re-prune when due, and return the dense pruned model."""
        valid, _ = self._check_and_log_replies([self._complete(m) for m in replies], is_train=True)
        metrics = None
        if self._global is None or self.masks is None:
            raise RuntimeError("aggregate_train called before configure_train")
        if valid:
            decoded, weights = [], []
            for msg in valid:
                record = msg.content[self.arrayrecord_key]
                tensors, _ = codec.decode(codec.from_array_record(record))
                if set(tensors) != set(self._global):
                    raise ValueError(
                        f"reply from node {msg.metadata.src_node_id} carries tensors {sorted(tensors)}, "
                        f"expected {sorted(self._global)}"
                    )
                decoded.append(tensors)
                metric_record = next(iter(msg.content.metric_records.values()))
                weights.append(float(metric_record[self.weighted_by_key]))
            total = sum(weights)
            if not total > 0:
                raise ValueError(f"replies' {self.weighted_by_key!r} sum to {total}; cannot weight the average")
            if self.aggregation is None:
                rho = [w / total for w in weights]
                aggregate = {name: weighted_mean([d[name] for d in decoded], rho) for name in self._global}
            else:  # the decoded (masked) models, combined by the robust rule against the model sent
                aggregate = self.aggregation.combine_models(decoded, weights, self._global)
            metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
            self._round_info.setdefault(server_round, {})["reg_grad_ratio"] = _reg_ratios(metrics, self.prunable)
        else:  # no replies: keep the model, still apply the schedule (the last round must reach s_p)
            aggregate = {name: x.copy() for name, x in self._global.items()}

        # Sparse replies decode to zeros at pruned positions; dense ones (regrowth, re-pruning round)
        # carry every value. Outside re-pruning rounds both are masked below, so they aggregate alike.
        if self.regrowth == "persistent" and self._dense is not None:
            # clients started from 0 at pruned positions: the aggregate there is the mean change,
            # added to the values the server kept; kept positions are the aggregate itself
            for n in self.prunable:
                pruned = ~self.masks[n].numpy()
                aggregate[n] = np.where(pruned, self._dense[n] + aggregate[n], aggregate[n]).astype(
                    self._dense[n].dtype
                )
                self._dense[n] = np.array(aggregate[n], copy=True)
        old_masks = self.masks
        reconfigured = self.reconfigures_at(server_round)
        if reconfigured and server_round == self.dense_rounds:  # the end of the dense rounds: m_0
            self.masks = self._initial_masks({n: torch.from_numpy(np.array(aggregate[n])) for n in self.prunable})
            self.last_reconfig_round = server_round
            self.reconfig_rounds.append(server_round)
        elif reconfigured:
            s_t = self.sparsity_at(server_round)
            prunable = {n: torch.from_numpy(np.array(aggregate[n])) for n in self.prunable}
            if self.regrowth == "false":  # nested: rank w ⊙ m_old, new mask ⊆ old mask
                prunable = {n: t * self.masks[n] for n, t in prunable.items()}
                self.masks = global_magnitude_masks(prunable, s_t, current_masks=self.masks)
            else:
                self.masks = global_magnitude_masks(prunable, s_t)
            self.last_reconfig_round = server_round
            self.reconfig_rounds.append(server_round)
        self._global = self._masked(aggregate)
        info = self._round_info.setdefault(server_round, {"lambda": self.lambda_at(server_round)})
        info.update(
            target_sparsity=self.sparsity_at(server_round),
            reconfigured=reconfigured,
            sparsity=self.measured_sparsity(),
            mask_sparsity=self.mask_sparsity(),
            regrown=sum(int((self.masks[n] & ~old_masks[n]).sum()) for n in self.prunable),
        )
        arrays = ArrayRecord({name: Array(x) for name, x in self._global.items()})
        return arrays, metrics

    def validate_reply(self, server_round: int, msg: Message) -> str | None:
        """fedsparse's reply screen hook (``fedsparse.validation``): None to accept, else the reason.

        A reply must be a decodable codec payload holding exactly the model's tensors (names, shapes,
        dtypes) but those the round's clients were told to leave out, finite; in a round with the
        sparse uplink (:meth:`sparse_uplink_at`: always with nested masks, outside re-pruning rounds
        with regrowth) it may carry entries only inside the round's mask. A rejected reply is not
        aggregated.
        """
        if self._global is None or self.masks is None:
            return "no round has been configured yet"
        record = single_array_record(msg, self.arrayrecord_key)
        if isinstance(record, str):
            return record
        try:
            tensors, kept = decode_payload(record)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            return f"not a decodable {codec.CODEC_NAME} payload: {err}"
        spec = {n: (tuple(x.shape), x.dtype.str) for n, x in self._global.items()}
        problem = check_arrays(tensors, spec, omit=self._omit)
        return problem or self.entries_outside_mask(server_round, kept)

    def _complete(self, msg: Message) -> Message:
        """``msg`` with the arrays its client left out (:attr:`_omit`) filled in from the global
        model it received (a copy; ``msg`` itself is not changed)."""
        if msg.has_error() or not self._omit or self._global is None:
            return msg
        tensors, masks = decode_payload(msg.content[self.arrayrecord_key])
        missing = [k for k in self._omit if k not in tensors]
        if not missing:
            return msg
        for k in missing:
            tensors[k] = self._global[k]
        keep = {k: (masks[k] if k in masks else self.masks[k].numpy()) for k in self.prunable if self.masks is not None}
        ordered = {k: tensors[k] for k in self._global}
        record = codec.to_array_record(codec.encode(ordered, {k: np.asarray(v, dtype=bool) for k, v in keep.items()}))
        content = RecordDict(
            {name: (record if name == self.arrayrecord_key else rec) for name, rec in msg.content.items()}
        )
        clone = copy.copy(msg)
        clone.content = content
        return clone

    def use_aggregation(self, rule: AggregationRule) -> FedDIP:
        """Combine the decoded replies with ``rule`` (:mod:`fedsparse.robust`) in place of the
        weighted mean; masking and re-pruning then act on its result as on the mean."""
        self.aggregation = None if rule.is_plain_mean else rule
        return self

    def constrain(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` with every prunable tensor multiplied by the current mask (a wrapper that moved
        the model keeps it inside the mask); unchanged while there is no mask yet."""
        if not self.masks:
            return arrays
        out = {}
        for k, a in arrays.items():
            x = a.numpy()
            if k in self.masks:
                x = np.where(self.masks[k].numpy(), x, np.zeros((), x.dtype))
            out[k] = Array(np.asarray(x, order="C"))
        return ArrayRecord(out)

    def entries_outside_mask(self, server_round: int, kept: Mapping[str, np.ndarray]) -> str | None:
        """In a sparse-uplink round, the first prunable tensor of ``kept`` (a decoded reply's masks)
        with entries outside the round's mask, as a reason to reject; None otherwise. Tensors absent
        from ``kept`` (left out by LUAR under feddip-luar) are not checked."""
        if self.masks is None or not self.sparse_uplink_at(server_round):
            return None
        for name in self.prunable:
            if name not in kept:
                continue
            outside = int(np.count_nonzero(kept[name] & ~self.masks[name].numpy()))
            if outside:
                return f"sparse uplink expected: {name!r} carries {outside} entries outside the round's mask"
        return None

    def mask_sparsity(self) -> float:
        """Fraction of pruned positions in the current mask (prunable tensors pooled)."""
        if self.masks is None:
            return math.nan
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total

    def summary(self) -> None:
        super().summary()
        from logging import INFO

        from flwr.supercore import log

        log(
            INFO,
            "\t└──> FedDIP: T=%d s0=%.3f sp=%.3f R=%d λmax=%g Q=%d regrowth=%s μ=%g",
            self.total_rounds,
            self.initial_sparsity,
            self.target_sparsity,
            self.reconfig_every,
            self.lambda_max,
            self.lambda_steps,
            self.regrowth,
            self.proximal_mu,
        )

    # ------------------------------------------------------------------ fedsparse hooks
    def round_report(self, server_round: int) -> dict[str, Any]:
        """Columns for rounds.csv: measured sparsity of the global model, λ_τ, s_τ, reconfigured,
        ``regrown`` (positions in the new mask that the old mask had pruned), and per prunable layer ``reg_grad_ratio:<layer>``: λ over the norm of the rest of the
        clients' gradient (mean over steps, weighted over replies; NaN in a round without replies)."""
        info = self._round_info.get(server_round, {})
        ratios = info.get("reg_grad_ratio", {})
        return {
            "sparsity": info.get("sparsity", math.nan),
            "mask_sparsity": info.get("mask_sparsity", math.nan),
            "lambda": info.get("lambda", self.lambda_at(server_round)),
            "target_sparsity": info.get("target_sparsity", self.sparsity_at(server_round)),
            "reconfigured": bool(info.get("reconfigured", False)),
            "regrown": info.get("regrown", 0),
            **{f"reg_grad_ratio:{n}": ratios.get(n, math.nan) for n in self.prunable},
        }

    def layer_table(self) -> list[dict[str, Any]]:
        """Per prunable layer: size, kept weights, measured sparsity, and the ERK initial sparsity."""
        rows = []
        measured = self.per_layer_sparsity()
        for name in self.prunable:
            numel = int(self._global[name].size) if self._global is not None else 0
            rows.append(
                {
                    "layer": name,
                    "numel": numel,
                    "kept": int(self.masks[name].sum()) if self.masks is not None else numel,
                    "sparsity": measured.get(name, math.nan),
                    "initial_sparsity": 1.0 - self.initial_densities.get(name, 1.0),
                }
            )
        return rows

    def final_report(self, out_dir: str | Path) -> dict[str, Any]:
        """Per-layer sparsity table (``feddip_layer_sparsity.csv``) and plot (the paper's Figure 5)."""
        import pandas as pd

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        table = pd.DataFrame(self.layer_table())
        csv = out_dir / "feddip_layer_sparsity.csv"
        atomic_write(csv, table.to_csv(index=False))
        png = out_dir / "feddip_layer_sparsity.png"
        if len(table):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(table) + 2), 4))
            x = np.arange(len(table))
            ax.bar(x - 0.2, table["initial_sparsity"], width=0.4, label="initial (ERK, s0)")
            ax.bar(x + 0.2, table["sparsity"], width=0.4, label="final (measured)")
            ax.set_xticks(
                x, [f"{n}\n({k})" for n, k in zip(table["layer"], table["numel"])], rotation=45, ha="right", fontsize=7
            )
            ax.set_ylabel("sparsity")
            ax.set_ylim(0, 1)
            ax.set_title(f"FedDIP per-layer sparsity (s_p = {self.target_sparsity})")
            ax.grid(axis="y", alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(png, dpi=120)
            plt.close(fig)
        return {
            "final_sparsity": self.measured_sparsity(),
            "final_mask_sparsity": self.mask_sparsity(),
            "reconfig_rounds": len(self.reconfig_rounds),
            "layer_sparsity": {r["layer"]: r["sparsity"] for r in self.layer_table()},
            "layer_sparsity_csv": str(csv),
        }

    def state_dict(self) -> dict[str, Any]:
        """Masks (numpy bool arrays) and JSON-able scalars, enough to resume the schedule."""
        return {
            "masks": None if self.masks is None else {n: m.numpy().copy() for n, m in self.masks.items()},
            "dense": None if self._dense is None else {n: x.copy() for n, x in self._dense.items()},
            "prunable": list(self.prunable),
            "initial_densities": dict(self.initial_densities),
            "last_reconfig_round": self.last_reconfig_round,
            "reconfig_rounds": list(self.reconfig_rounds),
            "hyper": {
                "total_rounds": self.total_rounds,
                "initial_sparsity": self.initial_sparsity,
                "target_sparsity": self.target_sparsity,
                "reconfig_every": self.reconfig_every,
                "lambda_max": self.lambda_max,
                "lambda_steps": self.lambda_steps,
                "regrowth": self.regrowth,
                "proximal_mu": self.proximal_mu,
                "seed": self.seed,
                "initial_mask": self.initial_mask,
                "dense_rounds": self.dense_rounds,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (hyper-parameters must match)."""
        mine = self.state_dict()["hyper"]
        theirs = dict(state.get("hyper", {}))
        if "regrowth" in theirs:  # saved as a bool before regrowth had a third setting
            theirs["regrowth"] = str(theirs["regrowth"]).lower()
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if k in theirs and theirs[k] != v}
        if diff:
            raise ValueError(f"FedDIP state was saved with different settings (saved, current): {diff}")
        masks = state.get("masks")
        self.masks = (
            None if masks is None else {n: torch.from_numpy(np.asarray(m, dtype=bool).copy()) for n, m in masks.items()}
        )
        self.prunable = list(state.get("prunable", []))
        self.initial_densities = {k: float(v) for k, v in dict(state.get("initial_densities", {})).items()}
        self.last_reconfig_round = int(state.get("last_reconfig_round", 0))
        self.reconfig_rounds = [int(r) for r in state.get("reconfig_rounds", [])]
        dense = state.get("dense")
        self._dense = None if dense is None else {n: np.array(x, copy=True) for n, x in dense.items()}
        self._global = None


def _reg_ratios(metrics: MetricRecord | None, prunable: list[str]) -> dict[str, float]:
    """The aggregated :data:`METRIC_REG_RATIO` list by layer name (empty when the replies lack it:
    a user's own ClientApp need not send it)."""
    values = None if metrics is None else metrics.get(METRIC_REG_RATIO)
    if not isinstance(values, list) or len(values) != len(prunable):
        return {}
    return {n: float(v) for n, v in zip(prunable, values)}


def build_feddip(cfg: Mapping[str, Any]) -> FedDIP:
    """FedDIP from the run configuration (also feddip-luar's base)."""
    total = int(cfg["feddip-schedule-rounds"]) or int(cfg["rounds"])
    return FedDIP(
        total_rounds=total,
        initial_sparsity=float(cfg["initial-sparsity"]),
        target_sparsity=float(cfg["target-sparsity"]),
        reconfig_every=int(cfg["reconfig-every"]),
        lambda_max=float(cfg["lambda-max"]),
        lambda_steps=int(cfg["lambda-steps"]),
        regrowth=str(cfg["regrowth"]),
        proximal_mu=float(cfg["proximal-mu"]) if bool(cfg["feddip-prox"]) else 0.0,
        seed=int(cfg["seed"]),
        initial_mask=str(cfg["initial-mask"]),
        dense_rounds=int(cfg["dense-rounds"]),
        **sampling_kwargs(cfg),
    )


METHOD = Method(
    name="feddip",
    codec_model_reply=True,
    reply_metrics=REPLY_METRICS,
    summary="FedDIP (Long et al., 2023): dynamic pruning + incremental regularisation, sparse model on the wire",
    build=build_feddip,
    client_step="clients.feddip:feddip_train_step",
    keys=KEYS,
    checks=(check_sparsities, check_dense_rounds),
    error_cases=(
        ErrorCase("FedDIP: target sparsity 1", {"target-sparsity": 1.0}),
        ErrorCase("FedDIP: initial above target sparsity", {"initial-sparsity": 0.8, "target-sparsity": 0.5}),
        ErrorCase("FedDIP: dense rounds cover the whole schedule", {"rounds": 3, "dense-rounds": 3}),
    ),
)
