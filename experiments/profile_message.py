"""Where a client message's CPU goes on the ClientApp side, measured in one process (no Ray).

Each message goes the way Flower's Ray backend sends it: ``(app loader, message, context)`` pickled
with Ray's cloudpickle and unpickled, the ClientApp called, ``(reply, context)`` pickled back. CPU
time (``time.process_time``, so the figures hold on a loaded machine) is split into the local
training (``train_steps``: forward, backward, optimizer steps), Ray's pickling, and the rest of the
handler — our code: message decode, data lookup, seeding, model load, optimizer, codec/compressor,
context state, reply encode. The best of three repetitions is printed; ``--profile`` adds cProfile's
top entries (which inflate many small calls)::

    PYTHONPATH=. python -m experiments.profile_message --strategy fedavg --messages 200
    PYTHONPATH=/path/to/other/checkout python experiments/profile_message.py ...   # before/after
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from ray import cloudpickle

import clients.compression
import clients.standard
import clients.train
from clients.app import make_client_app
from fedsparse.config import resolve_config
from fedsparse.global_model import initial_model
from fedsparse.methods import build_strategy


class _Nodes:
    """The least of a Grid that ``configure_train`` needs: node ids and message creation."""

    def __init__(self, n: int) -> None:
        self.ids = list(range(100, 100 + n))

    def get_node_ids(self) -> list[int]:
        return self.ids

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: Any = None) -> Any:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cfg = resolve_config(
        {
            "dataset": "mnist",
            "model": "lenet5",
            "num-clients": 1000,
            "clients-per-round": 100,
            "local-steps": 2,
            "batch-size": 64,
            "lr": 0.05,
            "strategy": args.strategy,
            "wire-bytes": False,
        }
    )
    app = make_client_app(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    msgs = list(build_strategy(cfg).configure_train(1, arrays, ConfigRecord({"server-round": 1}), _Nodes(1000)))
    contexts = {
        m.metadata.dst_node_id: Context(
            run_id=1,
            node_id=m.metadata.dst_node_id,
            node_config={"partition-id": m.metadata.dst_node_id - 100, "num-partitions": 1000},
            state=RecordDict(),
            run_config={},
        )
        for m in msgs
    }

    def load() -> Any:
        return app

    spent = {"train": 0.0, "pickle": 0.0}
    original = clients.train.train_steps

    def timed(*a: Any, **k: Any) -> Any:
        t = time.process_time()
        out = original(*a, **k)
        spent["train"] += time.process_time() - t
        return out

    clients.standard.train_steps = timed  # type: ignore[assignment]
    clients.compression.train_steps = timed  # type: ignore[assignment]

    def one(m: Message) -> None:
        t = time.process_time()
        a_fn, mm, ctx = cloudpickle.loads(cloudpickle.dumps((load, m, contexts[m.metadata.dst_node_id])))
        spent["pickle"] += time.process_time() - t
        out = a_fn()(message=mm, context=ctx)
        t = time.process_time()
        out, ctx = cloudpickle.loads(cloudpickle.dumps((out, ctx)))
        spent["pickle"] += time.process_time() - t
        contexts[m.metadata.dst_node_id] = ctx

    for m in msgs[:30]:  # warm-up: imports, caches, first-use costs
        one(m)
    best: tuple[float, float, float] | None = None
    for _ in range(3):
        spent.update(train=0.0, pickle=0.0)
        t = time.process_time()
        for i in range(args.messages):
            one(msgs[i % len(msgs)])
        total = (time.process_time() - t) / args.messages * 1e3
        got = (total, spent["train"] / args.messages * 1e3, spent["pickle"] / args.messages * 1e3)
        if best is None or got[0] - got[1] < best[0] - best[1]:
            best = got
    assert best is not None
    total, train, pickling = best
    print(
        f"{args.strategy}: {total:.2f} ms CPU per message: local training {train:.2f}, Ray's pickling "
        f"{pickling:.2f}, the rest of the ClientApp path (ours) {total - train - pickling:.2f}"
    )
    if args.profile:
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        for i in range(args.messages):
            one(msgs[i % len(msgs)])
        prof.disable()
        buffer = io.StringIO()
        pstats.Stats(prof, stream=buffer).sort_stats("cumulative").print_stats(40)
        print(buffer.getvalue())


if __name__ == "__main__":
    main()
