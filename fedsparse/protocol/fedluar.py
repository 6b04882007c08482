"""FedLUAR's message layout and client schedule, shared by :mod:`strategies.fedluar` and
:mod:`clients.fedluar` (and the LUAR combinations).

The round's ``config`` names, under :data:`RECYCLED_CONFIG_KEY`, the arrays of the layers the server
recycles; clients leave them out of their reply (they are absent from the message, so from the
uplink bytes too). Clients follow the paper's learning-rate milestones when the run sets
``luar-lr-milestones``: both sides compute that schedule with :func:`luar_round_lr`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsparse.config import ConfigError, round_lr
from fedsparse.protocol import OMITTED_ARRAYS
from fedsparse.schedules import milestone_lr

#: Config entry (a list of array names) telling clients which arrays to leave out of the reply.
RECYCLED_CONFIG_KEY = OMITTED_ARRAYS


def parse_milestones(text: str) -> list[int]:
    """``"100,150"`` → [100, 150]; empty → []. Raises ConfigError naming the bad entry."""
    out: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(
                f"luar-lr-milestones = {text!r}: {part!r} is not a round number; allowed: comma-separated integers >= 1"
            )
        out.append(value)
    return sorted(out)


def luar_round_lr(cfg: Mapping[str, Any], server_round: int) -> float:
    """The client learning rate of ``server_round``: the core schedule, then LUAR's milestones."""
    base = round_lr(cfg, max(server_round, 1))
    milestones = parse_milestones(str(cfg.get("luar-lr-milestones", "")))
    if not milestones:
        return base
    return milestone_lr(base, max(server_round, 1), milestones, float(cfg.get("luar-lr-gamma", 0.1)))


__all__ = ["RECYCLED_CONFIG_KEY", "parse_milestones", "luar_round_lr"]
