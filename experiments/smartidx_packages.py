"""SmartIdx on one real client update: sent fraction and bytes by package against the kernel threshold,
beside SBC and Top-k at the same sent fraction (measured payload bytes; runs no federation).

A model of the SmartIdx appendix (VGG11*, ResNet18*) is trained centrally for ``--warm`` SGD steps (so
the update is not the one of a random network), then one client's update is taken over ``--steps``
more steps (batch 32, lr 0.05, the suite's client setting). SmartIdx encodes it at
``compress-ratio`` = ``--ratio`` for each kernel threshold; SBC and Top-k (per tensor) encode it at
SmartIdx's measured sent fraction::

    FEDSPARSE_DATA=../shared/data python -m experiments.smartidx_packages --model vgg11-star
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from fedsparse import compressors as cc
from fedsparse.data import load_dataset
from fedsparse.models import build_model
from fedsparse.smartidx import PACKAGES, SmartIdx, package_bytes


def _train(model: torch.nn.Module, data: Any, steps: int, rng: np.random.Generator) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, data.train_images.shape[0], size=32))
        x, y = data.normalize(data.train_images[idx]), data.train_labels[idx]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg11-star")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--warm", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.2, 0.3, 0.4, 0.5, 0.7])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = load_dataset(args.dataset)
    model = build_model(args.model, data.num_classes, data.in_channels, data.image_size)
    _train(model, data, args.warm, rng)
    before = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    _train(model, data, args.steps, rng)
    update = {k: v.detach().numpy() - before[k] for k, v in model.state_dict().items()}
    dense = sum(x.nbytes for x in update.values())
    print(f"{args.model} on {args.dataset}: update of {dense / 4:.0f} floats ({dense} bytes)")
    columns = ["threshold", "sent fraction", "SmartIdx B", *(f"{p} idx/val/sign B" for p in PACKAGES)]
    columns += ["kernels KP / PP (patterns)", "SBC B", "Top-k B"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for threshold in args.thresholds:
        enc = SmartIdx(args.ratio, kernel_threshold=threshold).encode(update, {}, 0, want_sent=False)
        pb = package_bytes(enc.payload)
        total = sum(a.nbytes for a in enc.payload.values())
        sbc, _, _ = cc.compress_update(update, cc.SBC(enc.kept_fraction).round_config())
        topk, _, _ = cc.compress_update(update, cc.TopK(enc.kept_fraction, "tensor").round_config())
        parts = " | ".join(f"{pb[f'{p}_index']}/{pb[f'{p}_value']}/{pb[f'{p}_sign']}" for p in PACKAGES)
        print(
            f"| {threshold} | {enc.kept_fraction:.4f} | {total} | {parts} | {pb['kp_kernels']} / "
            f"{pb['pp_kernels']} ({pb['pp_patterns']}) | {sum(a.nbytes for a in sbc.values())} | "
            f"{sum(a.nbytes for a in topk.values())} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
