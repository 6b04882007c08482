"""The ServerApp side of a run: the round loop, central evaluation, accounting and results.

The loop is Flower's ``Strategy.start`` protocol (configure_train → send_and_receive →
aggregate_train, then a central evaluation), written out so that it can meter bytes, sample
clients reproducibly, show progress and write the rounds table after every round. Any
``flwr.serverapp.strategy.Strategy`` runs in it unchanged; our strategies also run in
``Strategy.start`` in someone else's deployment.

Reliability (docs/reliability.md): replies are screened (:mod:`fedsparse.validation`) before
aggregation; a round with fewer than ``min-replies`` valid replies keeps the previous model; every
``checkpoint-every`` rounds the state of the run is saved (:mod:`fedsparse.checkpoint`) and
``run_server(..., resume=True)`` continues from it.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedsparse import checkpoint as ckpt
from fedsparse import stopping
from fedsparse.accounting import Ledger, dense_model_bytes
from fedsparse.clientdata import partitions_for
from fedsparse.config import ConfigError, round_lr
from fedsparse.global_model import CentralEvaluator, initial_model
from fedsparse.grid import AUTO, MeteredGrid, parse_max_in_flight, seeded_sampling
from fedsparse.hooks import MethodHooks
from fedsparse.methods import build_strategy, method
from fedsparse.progress import Progress
from fedsparse.results import RoundsTable, config_text, write_outputs
from fedsparse.validation import ReplyScreen, Screened, spec_of

log = logging.getLogger("fedsparse")


@dataclass
class RunResult:
    """What a run returns: its rounds table, summary (empty when stopped), final arrays; for a run
    stopped by a signal, the last complete round and whether it is checkpointed."""

    rounds: pd.DataFrame
    summary: dict[str, Any]
    arrays: ArrayRecord
    out_dir: Path | None
    stopped_after: int | None = None
    checkpointed: bool = False


@dataclass
class _RoundStart:
    """The strategy and RNG state at the start of a round, for abandoning it mid-way."""

    strategy: dict[str, Any]
    rng: dict[str, Any]

    @classmethod
    def take(cls, strategy: Strategy) -> _RoundStart:
        return cls(ckpt.snapshot_strategy(strategy), ckpt.capture_rng())

    def restore(self, strategy: Strategy) -> None:
        ckpt.restore_strategy(strategy, self.strategy)
        ckpt.restore_rng(self.rng)


def _round_report(strategy: Strategy, server_round: int) -> dict[str, Any]:
    """Method-specific columns (sparsity, λ_t, recycled layers, k, ...) if the strategy has any."""
    return dict(strategy.round_report(server_round)) if isinstance(strategy, MethodHooks) else {}


def _mean_train_loss(replies: list[Message]) -> float:
    losses = [
        float(m.content["metrics"]["train-loss"])  # type: ignore[arg-type]  # a scalar by protocol; float() refuses a list
        for m in replies
        if "metrics" in m.content and "train-loss" in m.content["metrics"]
    ]
    return sum(losses) / len(losses) if losses else math.nan


def _finite(arrays: ArrayRecord) -> bool:
    for arr in arrays.values():
        x = arr.numpy()
        if x.dtype.kind in "fc" and not np.isfinite(x).all():
            return False
    return True


def in_model_dtypes(arrays: ArrayRecord, model_spec: Mapping[str, tuple[tuple[int, ...], str]]) -> ArrayRecord:
    """``arrays`` with every floating-point array back in the model's floating-point dtype.

    Server optimisers upcast: Flower's FedAdam / FedYogi / FedAdagrad compute
    x + η·m / (√v + τ) with float64 moments and return float64 arrays, and without this cast the
    next round would broadcast a float64 model — twice the downlink bytes of the float32 model the
    clients train (measured: FedAdam's downlink 1.99× FedAvg's on the 4-layer CNN), for precision
    the clients drop on load. The strategy's own state (its stored model and moments) keeps its
    precision; only what the loop holds and sends is cast. Integer buffers are left as they are.
    Returns ``arrays`` itself when nothing needs a cast.
    """
    cast: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        want = model_spec.get(name)
        if want is None:
            continue
        dtype, has = np.dtype(want[1]), np.dtype(arr.dtype)  # the Array's header: no decode per round
        if dtype.kind == "f" and has.kind == "f" and has != dtype:
            cast[name] = arr.numpy().astype(dtype)
    if not cast:
        return arrays
    return ArrayRecord({name: (Array(cast[name]) if name in cast else arr) for name, arr in arrays.items()})


def _screen_for(strategy: Strategy, cfg: Mapping[str, Any], metered: MeteredGrid, model: ArrayRecord) -> ReplyScreen:
    """Reply validation with the model's spec, each client's partition size as num-examples bound,
    ``reply-max-abs`` as the bound on every value and the method's declared reply metrics. A node
    whose partition is unknown (it never answered the partition query) is bounded by
    ``max-examples`` (0: the largest partition of the run's split — no client of this run holds
    more; the training set's size would let one unknown node outweigh all the others)."""
    sizes = [len(p) for p in partitions_for(cfg)]
    unknown = int(cfg.get("max-examples", 0)) or max(sizes)

    def bound(msg: Message) -> int:
        pid = metered.partition_of.get(msg.metadata.src_node_id, -1)
        return sizes[pid] if 0 <= pid < len(sizes) else unknown

    def describe(msg: Message) -> str:
        pid = metered.partition_of.get(msg.metadata.src_node_id, -1)
        return f"partition {pid}" if pid >= 0 else f"node {msg.metadata.src_node_id}"

    declared = method(str(cfg["strategy"])).reply_metrics
    return ReplyScreen(
        strategy,
        spec_of(model),
        bound,
        describe,
        max_abs=float(cfg.get("reply-max-abs", 0.0)) or None,
        metric_keys=declared,
    )


def _aggregate(
    strategy: Strategy, server_round: int, screened: Screened, min_replies: int, arrays: ArrayRecord
) -> tuple[ArrayRecord, bool]:
    """(new global arrays, whether the round's replies were aggregated).

    Below ``min-replies`` the strategy still sees the round end — ``aggregate_train`` with no
    replies, Flower's "nothing arrived" path — so it can settle its bookkeeping (partial-update
    marks the round's clients as needing a resynchronisation; FedDIP applies its pruning schedule);
    what it returns replaces the model only if it is finite.

    An aggregate that comes out non-finite (finite replies can still overflow) is discarded, and so
    is everything the aggregation did to the strategy: it is rolled back to a snapshot taken just
    before (:func:`fedsparse.checkpoint.snapshot_strategy`) and the round then ends exactly like one
    below ``min-replies``. Without the rollback the strategy would keep building on the bad
    aggregate (partial-update's deployed model, FedAvgM's / FedAdam's stored model and moments,
    FedDIP's masks re-pruned from NaN) while the loop kept the old model.
    """
    enough = len(screened.valid) >= min_replies
    if not enough:
        log.warning(
            "round %d: %d valid replies < min-replies = %d; the previous model is kept",
            server_round,
            len(screened.valid),
            min_replies,
        )
    snapshot = ckpt.snapshot_strategy(strategy)
    if enough:
        new_arrays, _metrics = strategy.aggregate_train(server_round, screened.valid)
        if new_arrays is None:
            return arrays, False
        if _finite(new_arrays):
            return new_arrays, True
        log.error(
            "round %d: the aggregated model is not finite; the strategy is rolled back, the previous model is "
            "kept and the round ends as one without valid replies",
            server_round,
        )
        if not ckpt.restore_strategy(strategy, snapshot):
            return arrays, False  # the round in flight could not be restored: nothing more to settle
    new_arrays, _metrics = strategy.aggregate_train(server_round, [])
    if new_arrays is None:
        return arrays, False
    if not _finite(new_arrays):
        log.error(
            "round %d: the model the strategy returned is not finite; it is rolled back and the previous model kept",
            server_round,
        )
        ckpt.restore_strategy(strategy, snapshot)
        return arrays, False
    return new_arrays, False


def _resume(
    out_dir: Path | None, cfg: Mapping[str, Any], strategy: Strategy, metered: MeteredGrid
) -> tuple[ckpt.Checkpoint, RoundsTable]:
    """Load ``out_dir``'s checkpoint into the strategy and the ledger; the rounds table so far."""
    if out_dir is None:
        raise ConfigError("resume needs the run's output directory")
    saved = ckpt.load_checkpoint(out_dir)
    conflicts = ckpt.config_conflicts(saved.config, cfg)
    if conflicts:
        detail = "; ".join(f"{k} = {v[0]!r} in the checkpoint, {v[1]!r} now" for k, v in conflicts.items())
        raise ckpt.CheckpointError(f"the checkpoint in {str(out_dir)!r} belongs to another configuration: {detail}")
    ckpt.load_strategy_state(strategy, saved.strategy)
    metered.ledger = saved.ledger
    ckpt.restore_rng(saved.rng)
    ckpt.drop_client_states_after(out_dir, saved.server_round)
    table = RoundsTable(out_dir, saved.rows)
    if saved.rows:
        table.write()  # drop rows of interrupted rounds
    if saved.source != ckpt.CHECKPOINT_FILE:
        log.warning(
            "resuming %s from the previous checkpoint (%s), after round %d", out_dir, saved.source, saved.server_round
        )
    else:
        log.info("resuming %s after round %d", out_dir, saved.server_round)
    return saved, table


def _fresh_start(out_dir: Path | None, cfg: Mapping[str, Any]) -> None:
    """A new run: its config next to the results, no stale checkpoint, client state or completion
    marker (``summary.json``, written last by a finished run) of a previous run in the directory."""
    if out_dir is None:
        return
    (out_dir / "summary.json").unlink(missing_ok=True)
    ckpt.atomic_write(out_dir / "config.toml", config_text(cfg))  # resume reads it: never a torn file
    ckpt.remove_checkpoints(out_dir)
    state_dir = out_dir / ckpt.CLIENT_STATE_DIR
    if state_dir.is_dir():
        shutil.rmtree(state_dir)


def run_server(
    grid: Grid,
    cfg: Mapping[str, Any],
    out_dir: Path | None,
    *,
    show_progress: bool = True,
    resume: bool = False,
) -> RunResult:
    """Run every round of ``cfg`` on ``grid`` and write the results to ``out_dir``.

    ``resume=True`` continues the run whose checkpoint is in ``out_dir`` (see docs/reliability.md).
    """
    started = time.perf_counter()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    metered = MeteredGrid(
        grid,
        Ledger(),
        measure_wire=bool(cfg["wire-bytes"]),
        max_in_flight=parse_max_in_flight(cfg.get("max-in-flight", AUTO)),
        client_resources=(float(cfg["client-cpus"]), float(cfg["client-gpus"])),
    )
    metered.discover_partitions(expected=int(cfg["num-clients"]))

    arrays = ArrayRecord(initial_model(cfg).state_dict())
    model_spec = spec_of(arrays)
    dense = dense_model_bytes(arrays)
    strategy = build_strategy(cfg)
    screen = _screen_for(strategy, cfg, metered, arrays)
    evaluator = CentralEvaluator(cfg)
    rounds, eval_every, eval_last = int(cfg["rounds"]), int(cfg["eval-every"]), int(cfg["eval-last"])
    min_replies, every = int(cfg.get("min-replies", 1)), int(cfg.get("checkpoint-every", 0))
    first_round, elapsed_before = 1, 0.0
    if resume:
        saved, table = _resume(out_dir, cfg, strategy, metered)
        arrays, first_round, elapsed_before = (
            in_model_dtypes(saved.arrays, model_spec),
            saved.server_round + 1,
            saved.elapsed_seconds,
        )
    else:
        table = RoundsTable(out_dir)
        _fresh_start(out_dir, cfg)
    progress = Progress(max(rounds - first_round + 1, 0), enabled=show_progress, label=str(cfg["strategy"]))
    run_id = f"{cfg['strategy']}-{cfg['dataset']}-{cfg['model']}-{cfg['partition']}-s{cfg['seed']}"

    last_complete, last_checkpoint = first_round - 1, first_round - 1
    keeps_checkpoints = out_dir is not None and every > 0
    for server_round in range(first_round, rounds + 1):
        if stopping.requested():
            break
        t0 = time.perf_counter()
        # What a stop in the middle of this round rolls back to (only when the run checkpoints).
        before = _RoundStart.take(strategy) if keeps_checkpoints else None
        metered.current_round = server_round
        # A fresh config each round: Flower's strategies write into it.
        train_config = ConfigRecord({"server-round": server_round})
        with seeded_sampling(int(cfg["seed"]), server_round):
            messages = list(strategy.configure_train(server_round, arrays, train_config, metered))
        replies = metered.in_partition_order(metered.send_and_receive(messages, timeout=float(cfg["round-timeout"])))
        if stopping.requested():  # the engine is going away: this round's replies cannot be trusted
            log.warning("round %d: stop requested; the round is abandoned, not recorded", server_round)
            metered.ledger.drop_rounds_after(server_round - 1)
            if before is not None:
                before.restore(strategy)
            break
        screened = screen.screen(server_round, replies)
        arrays, aggregated = _aggregate(strategy, server_round, screened, min_replies, arrays)
        arrays = in_model_dtypes(arrays, model_spec)  # a server optimiser's float64 is not broadcast
        ok, errors, train_loss = (
            len(replies) - len(screened.errors),
            len(screened.errors),
            _mean_train_loss(screened.valid),
        )

        acc = loss = math.nan
        if server_round % eval_every == 0 or server_round > rounds - max(eval_last, 1):
            loss, acc = evaluator(arrays)
        totals = metered.ledger.round_totals(server_round)
        row = {
            "run_id": run_id,
            "strategy": cfg["strategy"],
            "seed": cfg["seed"],
            "round": server_round,
            "clients": len(messages),
            "replies": len(screened.valid),
            "failures": errors + (len(messages) - len(replies)),
            "rejected": len(screened.rejected),
            "aggregated": aggregated,
            "test_accuracy": acc,
            "test_loss": loss,
            "train_loss": train_loss,
            "lr": round_lr(cfg, server_round),
            **totals,
            "dense_bytes_down": dense * len(messages),
            "dense_bytes_up": dense * ok,
            "round_seconds": time.perf_counter() - t0,
            "elapsed_seconds": elapsed_before + time.perf_counter() - started,
            **_round_report(strategy, server_round),
        }
        table.add(row)
        last_complete = server_round
        if keeps_checkpoints and (server_round % every == 0 or server_round == rounds):
            assert out_dir is not None
            _checkpoint(out_dir, server_round, cfg, arrays, strategy, table, metered, row["elapsed_seconds"])
            last_checkpoint = server_round
        progress.update(table.rows[-1])
    progress.close()

    df = table.frame()
    summary: dict[str, Any] = {}
    if stopping.requested():
        # Stopped: the last complete round is checkpointed (when the run checkpoints at all); the
        # outputs of a finished run (summary.json, its completion marker) are not written.
        if keeps_checkpoints and last_complete > last_checkpoint:
            assert out_dir is not None
            _checkpoint(
                out_dir, last_complete, cfg, arrays, strategy, table, metered, float(table.rows[-1]["elapsed_seconds"])
            )
        return RunResult(
            df,
            summary,
            arrays,
            out_dir,
            stopped_after=last_complete,
            checkpointed=keeps_checkpoints and last_complete > 0,
        )
    if out_dir is not None:
        ckpt.atomic_write(out_dir / "messages.csv", metered.ledger.messages_frame().to_csv(index=False))
        ckpt.atomic_write(out_dir / "layer_bytes.csv", metered.ledger.layers_frame().to_csv(index=False))
        extra = strategy.final_report(out_dir) if isinstance(strategy, MethodHooks) else None
        summary = write_outputs(out_dir, cfg, df, extra)
    return RunResult(df, summary, arrays, out_dir)


def _checkpoint(
    out_dir: Path,
    server_round: int,
    cfg: Mapping[str, Any],
    arrays: ArrayRecord,
    strategy: Strategy,
    table: RoundsTable,
    metered: MeteredGrid,
    elapsed: float,
) -> None:
    saved = ckpt.Checkpoint(
        server_round=server_round,
        config=dict(cfg),
        arrays=arrays,
        strategy=ckpt.strategy_state(strategy),
        rows=table.rows,
        ledger=metered.ledger,
        rng=ckpt.capture_rng(),
        elapsed_seconds=float(elapsed),
    )
    ckpt.save_checkpoint(out_dir, saved)
    # the client state the fallback checkpoint (the one before this) would need stays too
    previous = ckpt.previous_round(out_dir)
    ckpt.prune_client_states(out_dir, server_round if previous is None else min(previous, server_round))


def make_server_app(
    run_config: Mapping[str, Any] | None = None,
    out_dir: Path | None = None,
    sink: list[RunResult] | None = None,
    *,
    show_progress: bool = True,
    resume: bool = False,
    finished: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp bound to a resolved config (None: resolve ``context.run_config``).

    ``sink`` receives the :class:`RunResult` (the simulation engine runs the ServerApp in a
    thread of the calling process, so ``fedsparse.simulate`` collects it there); ``finished`` is
    set when the round loop has returned, however it ended (a stopped run waits for it).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedsparse.config import resolve_config

        cfg = run_config if run_config is not None else resolve_config(dict(context.run_config))
        target = out_dir
        if target is None:
            target = Path(str(cfg.get("out-dir", "")) or default_out_dir(cfg))
        try:
            result = run_server(grid, cfg, target, show_progress=show_progress, resume=resume)
            if sink is not None:
                sink.append(result)
        finally:
            if finished is not None:
                finished.set()

    return app


def default_out_dir(cfg: Mapping[str, Any]) -> Path:
    """runs/<strategy>-<dataset>-<timestamp> under the working directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg['strategy']}-{cfg['dataset']}-{cfg['model']}-{stamp}"


server_app = make_server_app()

__all__ = ["run_server", "make_server_app", "server_app", "RunResult"]
