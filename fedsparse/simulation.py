"""Launch a run on Flower's simulation engine (Ray backend): ``fedsparse.simulate(config)``.

Everything that can be wrong with a configuration — unknown names, ranges, a missing dataset, a
split that leaves a client empty — is checked here, in the calling process, before Ray starts.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from fedsparse.config import Config, ConfigError, resolve_config

log = logging.getLogger("fedsparse")


def preflight(cfg: Config) -> None:
    """Load the dataset and compute the split once (cached), so failures surface here."""
    from fedsparse.clientdata import partitions_for
    from fedsparse.data import PartitionError

    try:
        partitions_for(cfg)
    except PartitionError as err:
        raise ConfigError(str(err)) from err
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


def simulate(
    config: Mapping[str, Any] | str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    verbose: bool = False,
    ray_address: str | None = None,
    resume: str | Path | None = None,
) -> pd.DataFrame:
    """Run one configuration on Flower's simulation engine; return the rounds table.

    ``config`` is a mapping of kebab-case keys or a TOML file; ``overrides`` wins over it.
    Results (rounds.csv, config.toml, summary.json, plots) go to ``out_dir`` (default:
    ``runs/<strategy>-<dataset>-<model>-<time>``).

    ``resume=DIR`` continues the run in ``DIR`` from its checkpoint, with ``DIR/config.toml``
    (``config`` / ``overrides`` may only repeat it or change operational keys; see
    docs/reliability.md); results keep going to ``DIR``.
    """
    if resume is not None:
        from fedsparse.checkpoint import resume_config

        if out_dir is not None and Path(out_dir).resolve() != Path(resume).resolve():
            raise ConfigError(f"--out {str(out_dir)!r} differs from --resume {str(resume)!r}; a resumed run writes to its own directory")
        cfg = resume_config(resume, config, overrides)
        out_dir = resume
    else:
        cfg = resolve_config(config, overrides)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if cfg["data-dir"]:
        cfg["data-dir"] = str(Path(str(cfg["data-dir"])).resolve())
    preflight(cfg)
    from fedsparse.methods import client_app_factory
    from fedsparse.server import RunResult, default_out_dir, make_server_app

    make_client_app = client_app_factory()  # the installed runtime's ClientApp (entry point)

    target = Path(out_dir) if out_dir is not None else Path(str(cfg["out-dir"]) or default_out_dir(cfg))
    target.mkdir(parents=True, exist_ok=True)
    # absolute: clients mirror their state under it (checkpoint-every > 0), from other processes
    cfg["out-dir"] = str(target.resolve())
    sink: list[RunResult] = []
    _quiet_flower(verbose)

    from flwr.simulation import run_simulation

    run_simulation(
        server_app=make_server_app(cfg, target, sink, show_progress=progress, resume=resume is not None),
        client_app=make_client_app(cfg),
        num_supernodes=int(cfg["num-clients"]),
        backend_config=backend_config(cfg, ray_address),  # type: ignore[arg-type]
        verbose_logging=verbose,
    )
    if not sink:
        raise RuntimeError(f"the simulation ended without results; see the log above (output dir {target})")
    rounds = sink[0].rounds
    rounds.attrs["out_dir"] = str(target)
    return rounds
