"""What both sides of a method must agree on: message keys, payload layouts, the decode of a reply.

One module per method (:mod:`.feddip`, :mod:`.fedluar`, :mod:`.partial_update`, :mod:`.snip`; the
uplink compressors' payload formats are :mod:`fedsparse.compressors`), imported by the method's
strategy *and* its client step, so neither side imports the other. This module holds what every
method shares: the record names of Flower's message layout and the one check that a reply carries
exactly one ArrayRecord.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message

#: Record names of a train message (``arrays`` + ``config``) and of its reply (``arrays`` + ``metrics``),
#: as Flower's own strategies use them.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NUM_EXAMPLES = "num-examples"
#: the mean local training loss every built-in client reports (the loop's ``train_loss`` column)
TRAIN_LOSS = "train-loss"
#: the reply metrics of the methods whose clients run the standard local step (FedAvg, FedProx,
#: FedLUAR, SNIP's train rounds): besides ``num-examples``, the loss only
STANDARD_REPLY_METRICS = (TRAIN_LOSS,)
#: the uplink compressors' clients add the fraction of entries they kept
COMPRESSED_REPLY_METRICS = (TRAIN_LOSS, "kept-fraction")
#: Config entry (a list of array names) telling clients which arrays to leave out of this round's
#: reply. FedLUAR writes it for the layers it recycles; every base strategy that aggregates
#: payloads of its own (FedDIP, the compressors) honours it.
OMITTED_ARRAYS = "luar-recycled"
#: ArrayRecord of SGD momentum buffers (keyed by parameter name) that travels with a train message
#: and its reply under ``client-momentum = "slot"`` (:class:`fedsparse.wrappers.SlotMomentum`):
#: the server hands buffer k to the k-th sampled client and keeps what it sends back.
MOMENTUM_RECORD = "momentum"


def single_array_record(msg: Message, key: str = ARRAYS_KEY) -> ArrayRecord | str:
    """The reply's one ArrayRecord ``key``, or the reason to reject a reply that has other records."""
    records = msg.content.array_records
    if list(records) != [key]:
        return f"expected exactly one ArrayRecord named {key!r}, found {sorted(records)}"
    return records[key]


__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "METRICS_KEY",
    "NUM_EXAMPLES",
    "OMITTED_ARRAYS",
    "MOMENTUM_RECORD",
    "single_array_record",
]
