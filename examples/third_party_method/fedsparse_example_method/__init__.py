"""fedavg-signs: a fedsparse method shipped as a separate package (a worked example of the plug-in API).

Clients send the scaled sign of their update — one bit per trained weight plus one float32 scale per
tensor — and the server averages the scaled signs and applies them. ``pip install`` this package and
``strategy = "fedavg-signs"`` works in ``fedsparse run`` and ``flwr run``; fedsparse itself is not
edited. See README.md.

Nothing is imported here on purpose: the server imports only :mod:`.strategy` (through the entry
point) and the clients only :mod:`.client` (through ``Method.client_step``).
"""
