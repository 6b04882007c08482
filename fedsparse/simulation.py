"""Launch a run on Flower's simulation engine (Ray backend): ``fedsparse.simulate(config)``.

Everything that can be wrong with a configuration — unknown names, ranges, a missing dataset, a
split that leaves a client empty — is checked here, in the calling process, before Ray starts.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fedsparse import stopping
from fedsparse.config import Config, ConfigError, resolve_config
from fedsparse.rundir import prepare_out_dir

log = logging.getLogger("fedsparse")
#: How long a stopped run waits for the round loop to checkpoint and return.
STOP_GRACE_SECONDS = 60.0


def preflight(cfg: Config, ray_address: str | None = None) -> None:
    """Load the dataset and compute the split once (cached), so failures surface here; refuse a bad
    ``FEDSPARSE_INDEX_KINDS`` (else every client's encoder would fail in the actors) and client
    resources no actor of a local Ray could get (Flower's engine would stop with "ActorPool
    is empty" while the round loop waits)."""
    from fedsparse.clientdata import partitions_for
    from fedsparse.codec import default_index_kinds
    from fedsparse.data import PartitionError

    try:
        default_index_kinds()  # the benchmark switch FEDSPARSE_INDEX_KINDS, read by every encoder of the run
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        partitions_for(cfg)
    except PartitionError as err:
        raise ConfigError(str(err)) from err
    cores = os.cpu_count() or 1
    if not ray_address and float(cfg["client-cpus"]) > cores:
        raise ConfigError(
            f"client-cpus = {cfg['client-cpus']} exceeds the {cores} CPUs of this machine, so no client could "
            f"run; allowed: 0 < client-cpus <= {cores} (or --ray-address of a cluster with bigger nodes)"
        )
    if float(cfg["client-gpus"]) > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"client-gpus = {cfg['client-gpus']} but no CUDA device is visible; set client-gpus = 0 to run on CPU"
            )


def backend_config(cfg: Mapping[str, Any], ray_address: str | None = None) -> dict[str, Any]:
    """Ray backend settings: per-client resources, and an existing cluster when given."""
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if ray_address:
        init_args["address"] = ray_address
    resources: dict[str, Any] = {"num_cpus": float(cfg["client-cpus"]), "num_gpus": float(cfg["client-gpus"])}
    return {"client_resources": resources, "init_args": init_args}


def _quiet_flower(verbose: bool) -> None:
    """Flower logs several INFO lines per round; our progress bar replaces them."""
    if verbose:
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray warns on every start that it will stop overriding CUDA_VISIBLE_DEVICES for CPU actors.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _stop(finished: threading.Event, sink: list[Any], target: Path) -> None:
    """After a stop request: let the round loop finish abandoning its round, shut Ray down (quietly),
    raise :class:`fedsparse.stopping.RunInterrupted`."""
    finished.wait(timeout=STOP_GRACE_SECONDS)
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception as err:  # noqa: BLE001 - shutting down after a signal must not hide the stop itself
        log.warning("Ray did not shut down cleanly: %s", err)
    signum = stopping.signal_received() or signal.SIGINT
    last, checkpointed = _stopped_at(sink)
    raise stopping.RunInterrupted(signum, last, str(target), checkpointed)


def _engine_failed(crash: BaseException, finished: threading.Event, sink: list[Any], target: Path) -> None:
    """The engine raised while the round loop was still running: stop the loop as a signal would
    (it abandons its round and returns), then raise :class:`fedsparse.stopping.EngineFailed`."""
    stopping.abandon()
    finished.wait(timeout=STOP_GRACE_SECONDS)
    last, checkpointed = _stopped_at(sink)
    raise stopping.EngineFailed(crash, last, str(target), checkpointed) from crash


def _stopped_at(sink: list[Any]) -> tuple[int, bool]:
    """The last complete round of a stopped round loop, and whether it is checkpointed."""
    result = sink[0] if sink else None
    if result is None:
        return 0, False
    return int(result.stopped_after or 0), bool(result.checkpointed)


def simulate(
    config: Mapping[str, Any] | str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    verbose: bool = False,
    ray_address: str | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Run one configuration on Flower's simulation engine; return the rounds table.

    ``config`` is a mapping of kebab-case keys or a TOML file; ``overrides`` wins over it.
    Results (rounds.csv, config.toml, summary.json, plots) go to ``out_dir`` (default:
    ``runs/<strategy>-<dataset>-<model>-<time>``).

    ``resume=DIR`` continues the run in ``DIR`` from its checkpoint, with ``DIR/config.toml``
    (``config`` / ``overrides`` may only repeat it or change operational keys; see
    docs/reliability.md); results keep going to ``DIR``. Without it, an output directory that
    already holds a run is refused (:class:`fedsparse.rundir.RunExistsError`) unless
    ``overwrite=True``, which logs the files it replaces.
    """
    if resume is not None:
        from fedsparse.checkpoint import resume_config

        if out_dir is not None and Path(out_dir).resolve() != Path(resume).resolve():
            raise ConfigError(
                f"--out {str(out_dir)!r} differs from --resume {str(resume)!r}; a resumed run writes to its own directory"
            )
        cfg = resume_config(resume, config, overrides)
        out_dir = resume
    else:
        cfg = resolve_config(config, overrides)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if cfg["data-dir"]:
        cfg["data-dir"] = str(Path(str(cfg["data-dir"])).resolve())
    from fedsparse.methods import client_app_factory
    from fedsparse.server import RunResult, default_out_dir, make_server_app

    target = Path(out_dir) if out_dir is not None else Path(str(cfg["out-dir"]) or default_out_dir(cfg))
    if resume is None:
        replaced = prepare_out_dir(target, overwrite=overwrite)
        if replaced:
            log.warning("--overwrite: replacing the run in %s (%s)", target, ", ".join(replaced))
    preflight(cfg, ray_address)
    make_client_app = client_app_factory()  # the installed runtime's ClientApp (entry point)

    # absolute: clients mirror their state under it (checkpoint-every > 0), from other processes
    cfg["out-dir"] = str(target.resolve())
    sink: list[RunResult] = []
    _quiet_flower(verbose)

    from flwr.simulation import run_simulation

    finished = threading.Event()
    # Ray's C++ failure-signal handler would take SIGTERM from ours and abort the process (exit -6).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    with stopping.handling_signals():
        try:
            run_simulation(
                server_app=make_server_app(
                    cfg, target, sink, show_progress=progress, resume=resume is not None, finished=finished
                ),
                client_app=make_client_app(cfg),
                num_supernodes=int(cfg["num-clients"]),
                backend_config=backend_config(cfg, ray_address),
                verbose_logging=verbose,
            )
        except KeyboardInterrupt:
            stopping.request(stopping.signal_received() or signal.SIGINT)  # a Ctrl-C that reached Flower first
        except SystemExit as exit_:
            if exit_.code != signal.SIGTERM:
                raise
            stopping.request(signal.SIGTERM)  # ray.init installs its own SIGTERM handler: sys.exit(SIGTERM)
        except Exception as crash:
            if finished.is_set() or stopping.requested():
                raise  # the round loop itself ended with this error (Flower re-raises it here)
            _engine_failed(crash, finished, sink, target)
        if stopping.requested():
            _stop(finished, sink, target)
    if not sink:
        raise RuntimeError(f"the simulation ended without results; see the log above (output dir {target})")
    rounds = sink[0].rounds
    rounds.attrs["out_dir"] = str(target)
    return rounds
