"""SNIP's message layout, shared by :mod:`strategies.snip` and :mod:`clients.compression`.

A train message's ``config`` says which phase it is: ``snip-phase = "saliency"`` (reply with
|∂L/∂w ⊙ w| of the tensors named in ``snip-prunable``, summed over ``snip-batches`` batches, as a
plain ArrayRecord) or ``"train"`` (``arrays`` is the pruned model through :mod:`fedsparse.codec`;
the reply is the trained kept values through the same codec).
"""

from __future__ import annotations

CFG_SNIP_PHASE = "snip-phase"
CFG_SNIP_PRUNABLE = "snip-prunable"
CFG_SNIP_BATCHES = "snip-batches"
PHASES = ("saliency", "train")

__all__ = ["CFG_SNIP_PHASE", "CFG_SNIP_PRUNABLE", "CFG_SNIP_BATCHES", "PHASES"]
