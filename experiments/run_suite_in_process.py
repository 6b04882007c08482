"""Run a study suite's runs in this process, over an in-process grid instead of Ray.

Why: on a machine so loaded that Ray's node cannot start ("The current node timed out during
startup ... the GCS has become overloaded"), ``fedsparse bench`` cannot run anything. This runs the
same runs — the same resolved configs, the real round loop (``fedsparse.server.run_server``, with
its MeteredGrid, reply screen, central evaluation, checkpoints and outputs), the real strategy and
fedsparse's real ClientApp (``clients.app.make_client_app``) on one persistent Flower ``Context``
per node, as the simulation engine keeps them — and only replaces the transport: each message is
handed to the ClientApp in this process, one after another. Bytes are measured by the MeteredGrid
from the messages themselves, as in a Ray run. The results land in the bench layout
(``OUT/<run>/``), so ``fedsparse bench ... --dry-run`` and the report scripts read them, and a run
already finished is skipped (resumable).

    FEDSPARSE_DATA=... python -m experiments.run_suite_in_process experiments/suites/partial-update.toml \\
        --out runs/partial-update --splits mnist-mlp --only random-k0.005,combined-k0.05
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsparse import bench
from fedsparse.checkpoint import CHECKPOINT_FILE
from fedsparse.config import parse_overrides
from fedsparse.server import run_server


class InProcessGrid(Grid):
    """Nodes 100, 101, … hold partitions 0, 1, …; a message is the ClientApp's call on its node's
    Context. Nothing is retained between rounds (a run's replies would not fit in memory)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from clients.app import make_client_app

        self.client_app = make_client_app(cfg)
        n = int(cfg["num-clients"])
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": n},
                state=RecordDict(),
                run_config={},
            )
            for i in range(n)
        }
        self._pushed: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError("an in-process grid has no Run")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            key = f"m{len(self._pushed)}"
            self._pushed[key] = m
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return self.send_and_receive([self._pushed.pop(k) for k in message_ids])

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [self.client_app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def in_process_runner(spec: bench.RunSpec, cfg: Any, run_dir: Path, slot: Any) -> int:
    """bench's Runner: one run through the real round loop on an :class:`InProcessGrid`."""
    resume = (run_dir / CHECKPOINT_FILE).is_file()  # run_suite kept it: it belongs to this config
    run_server(InProcessGrid(dict(cfg)), cfg, run_dir, show_progress=False, resume=resume)
    return 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated methods (default: all)")
    ap.add_argument("--splits", default="", help="comma-separated splits (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every run")
    args = ap.parse_args(argv)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # messages built outside an app
    overrides = parse_overrides(args.set)
    suite = bench.load_suite(args.suite, overrides)
    bench.run_suite(
        suite,
        args.out,
        methods=[m for m in args.only.split(",") if m] or None,
        splits=[s for s in args.splits.split(",") if s] or None,
        runner=in_process_runner,
        command="python -m experiments.run_suite_in_process " + " ".join(argv or []),
    )


if __name__ == "__main__":
    main()
