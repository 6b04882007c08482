"""Byte figures of real Flower deployments: payload, wire and the SuperLink's own count.

Starts a SuperLink and two SuperNodes on 127.0.0.1 (``LocalDeployment`` of tests/deploy_harness.py), runs each
strategy through `flwr run` with the same small configuration, then sets the ledger's per-message
payload and wire bytes (messages.csv) beside the SuperLink's traffic count for the run
(`flwr ls --format json`), and writes the table as markdown.

    .venv/bin/python experiments/run_deployment.py --out runs/deployment \
        --table experiments/results/deployment.md

The local deployment is test tooling (tests/deploy_harness.py, not part of the installed package):
this script runs from a checkout and borrows it from there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedsparse.traffic import traffic_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from deploy_harness import PROJECT_DIR, LocalDeployment, data_env  # noqa: E402 - tests/ first on the path

BASE = {
    "num-clients": 2,
    "clients-per-round": 2,
    "rounds": 3,
    "local-steps": 5,
    "batch-size": 32,
    "lr": 0.05,
    "eval-every": 3,
    "seed": 0,
}
RUNS = {
    "fedavg": {"strategy": "fedavg"},
    "feddip": {"strategy": "feddip", "initial-sparsity": 0.5, "target-sparsity": 0.9, "reconfig-every": 1},
    "fedluar": {"strategy": "fedluar", "recycled-layers": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/deployment"))
    parser.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--no-example", action="store_true", help="skip examples/byo_clientapp")
    args = parser.parse_args()
    out = args.out.resolve()
    # the processes get a split cache of their own, so the data root is pinned first (data_env):
    # their XDG_CACHE_HOME no longer leads to the user cache that `fedsparse data fetch` fills
    env = {**data_env(), "HF_DATASETS_OFFLINE": "1", "XDG_CACHE_HOME": str(out / "xdg-cache")}
    rows = []
    with LocalDeployment(out / "deployment", 2, env=env) as dep:
        jobs = [(name, PROJECT_DIR, {**BASE, **extra, "out-dir": str(out / name)}) for name, extra in RUNS.items()]
        if not args.no_example:
            example = {"strategy": "feddip", "num-server-rounds": 3, "out-dir": str(out / "byo-feddip")}
            jobs.append(("byo example, feddip", PROJECT_DIR / "examples" / "byo_clientapp", example))
        for name, app, run_config in jobs:
            started = time.perf_counter()
            record = dep.run(app, run_config)
            report = traffic_report(run_config["out-dir"], record)
            rows.append((name, report, time.perf_counter() - started))
            print(f"{name}: {report}", flush=True)

    lines = [
        "| run | payload down | wire down | SuperLink sent | payload up | wire up | SuperLink received | wire/payload | SuperLink/wire (down, up) | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r, wall in rows:
        ratio_wire = (r["wire_down"] + r["wire_up"]) / (r["payload_down"] + r["payload_up"])
        lines.append(
            f"| {name} | {r['payload_down']:,} | {r['wire_down']:,} | {r['superlink_sent']:,} | {r['payload_up']:,} | "
            f"{r['wire_up']:,} | {r['superlink_received']:,} | {ratio_wire:.4f} | "
            f"{r['superlink_sent_over_wire_down']:.4f}, {r['superlink_received_over_wire_up']:.4f} | {wall:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        cfg = " ".join(f"{k}={v}" for k, v in BASE.items())
        args.table.write_text(
            "# Byte figures in a Flower deployment\n\n"
            "A SuperLink and two SuperNodes on 127.0.0.1 (`LocalDeployment`, tests/deploy_harness.py), runs submitted with\n"
            f"`flwr run`; base configuration `{cfg}` (Fashion-MNIST, LeNet-5, IID), plus per run:\n"
            + "".join(f"- {name}: `{extra}`\n" for name, extra in RUNS.items())
            + "- byo example: `examples/byo_clientapp` (own model and data, 3 rounds of FedDIP).\n\n"
            "Bytes summed over every train message of the run. *payload*: serialised arrays + keys + config and\n"
            "metric entries; *wire*: Σ len(deflate()) of every Flower object of the message (messages.csv);\n"
            "the ledger computes it once per content shared by a round's messages, so it is exact to within a\n"
            "few bytes per message (messages to different nodes differ in the node id); *SuperLink*: its own\n"
            "traffic count for the run (`flwr ls --format json`): protobuf sizes of the Fleet API requests and\n"
            "responses plus the object contents pushed and pulled, no HTTP/2, TLS or TCP overhead.\n\n"
            + table
            + "\n\nReproduce: `.venv/bin/python experiments/run_deployment.py --out runs/deployment "
            "--table experiments/results/deployment.md` (wall times depend on the machine's load).\n"
        )


if __name__ == "__main__":
    main()
