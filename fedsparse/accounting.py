"""Communication accounting from the bytes Flower actually serialises (see docs/accounting.md).

* **payload bytes** of a message: for every array it carries, the length of the serialised array
  (``len(Array.data)``, the ``.npy`` buffer Flower ships, header included) plus its key, and the
  ``count_bytes()`` of its config and metric records;
* **wire bytes**: the deflated size of every object the message is made of (what the SuperLink
  stores and moves), i.e. payload plus Flower's framing.

Nothing here is estimated from parameter counts: a strategy saves bytes only if the arrays it puts
in a message are smaller.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute

UP = "up"
DOWN = "down"


@dataclass(frozen=True)
class MessageBytes:
    """Payload size of one message, split per array (the per-layer view when keys are layer names)."""

    total: int
    per_array: dict[str, int]
    records: int  # config + metric record bytes


def array_record_bytes(record: ArrayRecord) -> dict[str, int]:
    """Bytes of each array in a record: the serialised buffer plus the key."""
    return {key: len(arr.data) + len(key) for key, arr in record.items()}


def payload_bytes(content: RecordDict) -> MessageBytes:
    """Payload bytes of a message's content (arrays, configs, metrics)."""
    per_array: dict[str, int] = {}
    for rec_name, record in content.array_records.items():
        for key, nbytes in array_record_bytes(record).items():
            per_array[key if len(content.array_records) == 1 else f"{rec_name}/{key}"] = nbytes
    records = sum(r.count_bytes() for r in content.config_records.values())
    records += sum(r.count_bytes() for r in content.metric_records.values())
    return MessageBytes(sum(per_array.values()) + records, per_array, records)


def wire_bytes(message: Message) -> int:
    """Exact serialised size of a message: Σ len(deflate()) over all its nested objects.

    Each object's id (a SHA-256 of its deflated form, which its parent's form contains) is computed
    once, as Flower's own grid does when it pushes messages (``no_object_id_recompute``): without
    it every parent re-hashes its whole subtree, the model's arrays included, about 1.5× the work.
    """
    with no_object_id_recompute():
        return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


@dataclass
class Ledger:
    """Every metered message of a run: one entry per (round, direction, client).

    The per-array detail is kept aggregated per (round, direction, array) so that large runs stay
    small in memory.
    """

    rows: list[dict] = field(default_factory=list)
    layer_bytes: dict[tuple[int, str, str], int] = field(default_factory=lambda: defaultdict(int))

    def record(
        self,
        server_round: int,
        direction: str,
        partition_id: int,
        node_id: int,
        nbytes: MessageBytes,
        wire: int | None,
        message_type: str,
    ) -> None:
        self.rows.append(
            {
                "round": server_round,
                "direction": direction,
                "partition_id": partition_id,
                "node_id": node_id,
                "message_type": message_type,
                "payload_bytes": nbytes.total,
                "wire_bytes": wire,
            }
        )
        for key, b in nbytes.per_array.items():
            self.layer_bytes[(server_round, direction, key)] += b

    def round_totals(self, server_round: int) -> dict[str, int]:
        """Payload and wire bytes of one round, per direction, and the number of clients reached."""
        out = {"bytes_up": 0, "bytes_down": 0, "wire_bytes_up": 0, "wire_bytes_down": 0}
        for row in self._rows_of(server_round):
            d = row["direction"]
            out[f"bytes_{d}"] += row["payload_bytes"]
            out[f"wire_bytes_{d}"] += row["wire_bytes"] or 0
        return out

    def _rows_of(self, server_round: int) -> Iterable[dict]:
        # Rows arrive in round order; scan from the end for speed on long runs.
        for row in reversed(self.rows):
            if row["round"] == server_round:
                yield row
            elif row["round"] < server_round:
                break

    def messages_frame(self) -> pd.DataFrame:
        """One row per metered message: round, direction, client, payload and wire bytes."""
        return pd.DataFrame(self.rows)

    def layers_frame(self) -> pd.DataFrame:
        """Bytes per (round, direction, array key): the per-layer view."""
        data = [
            {"round": r, "direction": d, "array": k, "bytes": b} for (r, d, k), b in sorted(self.layer_bytes.items())
        ]
        return pd.DataFrame(data, columns=["round", "direction", "array", "bytes"])

    def drop_rounds_after(self, server_round: int) -> None:
        """Forget rounds after ``server_round`` (used when a run resumes from a checkpoint)."""
        self.rows = [r for r in self.rows if r["round"] <= server_round]
        for key in [k for k in self.layer_bytes if k[0] > server_round]:
            del self.layer_bytes[key]


def dense_model_bytes(record: ArrayRecord) -> int:
    """Payload of the dense model as FedAvg sends it: the reference for every ratio we report."""
    return sum(array_record_bytes(record).values())
