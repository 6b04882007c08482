"""``fedsparse traffic``: the SuperLink's own byte count for a deployed run, beside the ledger's.

The SuperLink counts the bytes it sends to and receives from SuperNodes for each run (``flwr ls
--format json`` → ``network-traffic``). ``fedsparse traffic RUN_ID --superlink NAME --out-dir DIR``
fetches that count after a run and sets it next to the per-message payload and wire bytes of the
run's ``messages.csv``: an independent check of fedsparse's accounting in a real deployment.

Starting a local deployment to try this (SuperLink, SuperNodes, ``flwr run``) is test tooling and
lives with the tests (``tests/deploy_harness.py``); this module is only what the command needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Environment every Flower process we start gets: no `uv sync` of the app's dependencies per
#: run (the environment is already complete), no telemetry.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


class DeploymentError(RuntimeError):
    """A deployment process failed to start, a run failed, or a run did not finish in time."""


def flower_bin_dir() -> Path:
    """The directory holding ``flwr``, ``flower-superlink`` ... (this interpreter's scripts first)."""
    here = Path(sys.executable).parent
    if (here / "flower-superlink").exists():
        return here
    found = shutil.which("flower-superlink")
    if found is None:
        raise DeploymentError("flower-superlink not found next to this Python nor on PATH; install flwr")
    return Path(found).parent


def flwr_json(text: str) -> dict[str, Any]:
    """The JSON object in a ``flwr ... --format json`` output (ignoring any line before it)."""
    start = text.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return {}


def superlink_run(connection: str, run_id: int, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``flwr ls CONNECTION --run-id RUN_ID --format json`` → that run's record."""
    env = {**os.environ, **FLOWER_ENV, **(env or {})}
    done = subprocess.run(
        [str(flower_bin_dir() / "flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    reply = flwr_json(done.stdout)
    runs = reply.get("runs") or []
    if done.returncode != 0 or not reply.get("success") or not runs:
        raise DeploymentError(
            f"flwr ls {connection} --run-id {run_id} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return dict(runs[0])


def traffic_report(out_dir: str | Path | None, record: Mapping[str, Any]) -> dict[str, Any]:
    """The SuperLink's count for a run beside the ledger's payload and wire bytes.

    ``superlink_sent`` is what the SuperLink sent to SuperNodes (downlink), ``superlink_received``
    what it received from them (uplink); both cover every message of the run (the partition
    QUERY included) plus the Fleet API's request/response framing, and an object the SuperLink
    already holds is not received twice. Written to ``out_dir/superlink_traffic.json``.
    """
    traffic = record.get("network-traffic", {})
    report: dict[str, Any] = {
        "run_id": str(record.get("run-id", "")),
        "status": record.get("status"),
        "superlink_sent": int(traffic.get("outbound-bytes", 0)),
        "superlink_received": int(traffic.get("inbound-bytes", 0)),
        "superlink_total": int(traffic.get("total-bytes", 0)),
    }
    if out_dir is not None and (Path(out_dir) / "messages.csv").is_file():
        import pandas as pd

        msgs = pd.read_csv(Path(out_dir) / "messages.csv")
        for direction in ("down", "up"):
            rows = msgs[msgs["direction"] == direction]
            report[f"payload_{direction}"] = int(rows["payload_bytes"].sum())
            report[f"wire_{direction}"] = int(rows["wire_bytes"].fillna(0).sum())
        if report["wire_down"]:
            report["superlink_sent_over_wire_down"] = report["superlink_sent"] / report["wire_down"]
        if report["wire_up"]:
            report["superlink_received_over_wire_up"] = report["superlink_received"] / report["wire_up"]
        (Path(out_dir) / "superlink_traffic.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_traffic(report: Mapping[str, Any]) -> str:
    """The report as a small table: payload, wire and SuperLink bytes, down and up."""
    lines = [f"run {report['run_id']} ({report['status']})"]
    lines.append(f"  {'':10s} {'payload':>12s} {'wire':>12s} {'SuperLink':>12s}")
    for direction, sl in (("down", "superlink_sent"), ("up", "superlink_received")):
        payload = report.get(f"payload_{direction}")
        wire = report.get(f"wire_{direction}")
        cells = [f"{v:>12,}" if isinstance(v, int) else f"{'-':>12s}" for v in (payload, wire, report[sl])]
        lines.append(f"  {direction:10s} " + " ".join(cells))
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------
def add_traffic_command(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type, it has no public name
    """Register ``fedsparse traffic`` on the main parser's subcommands."""
    traffic = subparsers.add_parser(
        "traffic",
        help="fetch the SuperLink's traffic count for a deployed run",
        description="Ask the SuperLink (flwr ls) how many bytes a run moved, and set it beside the "
        "payload and wire bytes of the run's messages.csv.",
    )
    traffic.add_argument("run_id", type=int, help="the run id printed by `flwr run`")
    traffic.add_argument(
        "--superlink", default="", help="connection name in $FLWR_HOME/config.toml (default: the default one)"
    )
    traffic.add_argument(
        "--out-dir", type=Path, help="the run's out-dir (messages.csv; superlink_traffic.json is written there)"
    )
    traffic.set_defaults(func=_cmd_traffic)


def _cmd_traffic(args: argparse.Namespace) -> int:
    connection = args.superlink or _default_connection()
    try:
        record = superlink_run(connection, args.run_id)
    except DeploymentError as err:
        print(f"fedsparse: error: {err}", file=sys.stderr)
        return 1
    print(format_traffic(traffic_report(args.out_dir, record)))
    return 0


def _default_connection() -> str:
    """The default connection of ``$FLWR_HOME/config.toml`` (``local`` when there is none)."""
    import tomllib

    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    try:
        return str(tomllib.loads((home / "config.toml").read_text())["superlink"]["default"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "local"


__all__ = [
    "DeploymentError",
    "FLOWER_ENV",
    "add_traffic_command",
    "flower_bin_dir",
    "flwr_json",
    "format_traffic",
    "superlink_run",
    "traffic_report",
]
