"""Why GCPU's ``global`` ranking matches or beats DPU's ``combined`` here (issue 15, item 8): a
measurement, in process (no Ray), on the partial-update grid's federation.

MNIST / MLP 2×512, 50 IID clients, 10 sampled per round, 1 local epoch of batch 64, seed 0 —
the settings of ``experiments/suites/partial-update.toml`` — with plain SGD (lr 0.05) or Adam
(lr 1e-3). The deployed model w advances as GCPU at k = 0.05 (rewind); at the rounds listed in
``--at`` every alternative mask is scored on the *same* round (a counterfactual, as the paper's
Table 1 does for one round):

* the noise share of the exact local term. Per client c_l = −Σ_q g_q ⊙ Δw_q; under plain SGD that
  is lr·Σ_q g_q². Split Σ_q g_q² = Q·ḡ² + Σ_q (g_q − ḡ)²: the first part is the mean gradient
  (signal, what δ = −lr·Q·ḡ also carries), the second the minibatch noise. ``signal_share`` =
  Σ_i Q·ḡ_i² / Σ_i Σ_q g_qi² over the partial set, averaged over the round's clients; for pure
  noise it is 1/Q.
* the overlap of each mask with global's top-k·I, and Spearman's ρ between c_l and c_g;
* the paper's criterion (eq. 4–5, Table 1): the training loss after rewinding,
  ℓ(w + δ ⊙ m) on 6,000 training samples, and the test accuracy of w + δ ⊙ m, for m from
  global, local (exact), combined (exact c_l), combined (server estimate Σ ρ_n δ_n²) and random,
  next to ℓ(w + δ) (the full FedAvg step);
* ‖g(w_f)‖·‖δ‖ against ‖δ‖² (the two terms of eq. 4): eq. 5 drops the first, assuming w_f is at a
  minimum.

    FEDSPARSE_DATA=/work/shared/data python -m experiments.measure_pu_metrics --out runs/pu-metrics
    python -m experiments.measure_pu_metrics --optimizer adam --lr 1e-3 --out runs/pu-metrics-adam

Writes ``metrics.csv`` (one row per round × k × mask, after every measured round) and prints it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from clients.train import iterate_batches, make_optimizer
from fedsparse.clientdata import client_data, dataset_for
from fedsparse.config import resolve_config
from fedsparse.global_model import evaluate, initial_model
from fedsparse.masks import topk_mask
from fedsparse.protocol.partial_update import num_updated, partial_names


def _client_round(
    model: nn.Module, w: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor, cfg: Any, seed: int
) -> dict[str, Any]:
    """One client's local epoch from w: its model, exact c_l, Σ g² and Σ g (partial set)."""
    model.load_state_dict(w)
    names = partial_names(dict(model.named_parameters()))
    params = dict(model.named_parameters())
    opt = make_optimizer(model, float(cfg["lr"]), 0.0, 0.0, str(cfg["optimizer"]))
    c_l = {n: torch.zeros_like(params[n]) for n in names}
    g2 = {n: torch.zeros_like(params[n]) for n in names}
    g1 = {n: torch.zeros_like(params[n]) for n in names}
    gen = torch.Generator().manual_seed(seed)
    q = 0
    model.train()
    for x, y in iterate_batches(images, labels, int(cfg["batch-size"]), gen, dataset_for(cfg).normalize, epochs=1):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        before = {n: params[n].detach().clone() for n in names}
        opt.step()
        with torch.no_grad():
            for n in names:
                g = params[n].grad
                c_l[n] -= g * (params[n] - before[n])
                g2[n] += g * g
                g1[n] += g
        q += 1
    return {
        "w": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "c_l": c_l,
        "g2": g2,
        "g1": g1,
        "q": q,
        "n": len(labels),
    }


def _flat(t: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([t[n].reshape(-1).double() for n in names])


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra @ rb) / math.sqrt(float(ra @ ra) * float(rb @ rb)))


def _loss_grad_norm(
    model: nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> float:
    model.load_state_dict(w)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    params = dict(model.named_parameters())
    return float(torch.sqrt(sum((params[n].grad.double() ** 2).sum() for n in names)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--at", default="1,5,20,50", help="rounds at which the masks are compared")
    ap.add_argument("--ks", default="0.005,0.05")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    cfg = resolve_config(
        {
            "strategy": "fedavg",
            "dataset": args.dataset,
            "model": args.model,
            "partition": "iid",
            "num-clients": 50,
            "clients-per-round": 10,
            "local-epochs": 1,
            "batch-size": 64,
            "lr": args.lr,
            "optimizer": args.optimizer,
            "seed": 0,
        }
    )
    at = {int(r) for r in args.at.split(",")}
    ks = [float(k) for k in args.ks.split(",")]
    data = dataset_for(cfg)
    model = initial_model(cfg)
    w = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = partial_names(dict(model.named_parameters()))
    total = sum(w[n].numel() for n in names)
    # the fixed training sample for ℓ(·): clients 0-4 (6,000 images), the test set for accuracy
    tr = [client_data(cfg, p) for p in range(5)]
    x_tr = torch.cat([t[0] for t in tr])
    y_tr = torch.cat([t[1] for t in tr])
    x_norm = data.normalize(x_tr)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    eval_model = initial_model(cfg)

    def loss_acc(arrays: dict[str, torch.Tensor]) -> tuple[float, float]:
        eval_model.load_state_dict(arrays)
        train_loss, _ = evaluate(eval_model, x_tr, y_tr, data.normalize)
        _, acc = evaluate(eval_model, data.test_images, data.test_labels, data.normalize)
        return train_loss, acc

    for t in range(1, args.rounds + 1):
        sampled = sorted(rng.choice(50, size=10, replace=False).tolist())
        outs = [_client_round(model, w, *client_data(cfg, p), cfg, seed=1000 * t + p) for p in sampled]
        weights = np.array([o["n"] for o in outs], dtype=np.float64)
        rho = weights / weights.sum()
        w_new = {k: sum(float(r) * o["w"][k].double() for r, o in zip(rho, outs)).to(w[k].dtype) for k in w}
        delta = {n: (w_new[n] - w[n]).double() for n in names}
        c_g = {n: delta[n] ** 2 for n in names}
        if t in at:
            c_l = {n: sum(float(r) * o["c_l"][n].double() for r, o in zip(rho, outs)) for n in names}
            est = {
                n: sum(float(r) * (o["w"][n].double() - w[n].double()) ** 2 for r, o in zip(rho, outs)) for n in names
            }
            shares = []
            for o in outs:
                sig = float(sum(((o["g1"][n].double() ** 2) / o["q"]).sum() for n in names))
                tot = float(sum(o["g2"][n].double().sum() for n in names))
                shares.append(sig / tot)
            g_sum, l_sum, e_sum = (float(_flat(c, names).sum()) for c in (c_g, c_l, est))
            scores = {
                "global": c_g,
                "local": c_l,
                "combined": {n: c_g[n] / g_sum + c_l[n] / l_sum for n in names},
                "combined-server": {n: c_g[n] / g_sum + est[n] / e_sum for n in names},
            }
            grad_norm = _loss_grad_norm(eval_model, w_new, x_norm, y_tr, names)
            d_norm = float(torch.sqrt(sum((delta[n] ** 2).sum() for n in names)))
            full_loss, full_acc = loss_acc(w_new)
            start_loss, start_acc = loss_acc(w)
            base = {
                "round": t,
                "optimizer": args.optimizer,
                "steps_Q": outs[0]["q"],
                "signal_share": float(np.mean(shares)),
                "noise_floor_1_over_Q": 1.0 / outs[0]["q"],
                "spearman_cl_cg": _spearman(_flat(c_l, names), _flat(c_g, names)),
                "spearman_est_cg": _spearman(_flat(est, names), _flat(c_g, names)),
                "grad_norm_x_delta": grad_norm * d_norm,
                "delta_sq": d_norm**2,
                "loss_start": start_loss,
                "acc_start": start_acc,
                "loss_full": full_loss,
                "acc_full": full_acc,
            }
            for k in ks:
                kk = num_updated(k, total)
                gmask = topk_mask({n: c_g[n] for n in names}, kk)
                gen = torch.Generator().manual_seed(t)
                masks = {name: topk_mask(s, kk) for name, s in scores.items()}
                perm = torch.randperm(total, generator=gen)
                rflat = torch.zeros(total, dtype=torch.bool)
                rflat[perm[:kk]] = True
                masks["random"], off = {}, 0
                for n in names:
                    masks["random"][n] = rflat[off : off + w[n].numel()].reshape(w[n].shape)
                    off += w[n].numel()
                for name, m in masks.items():
                    rewound = dict(w_new)
                    for n in names:
                        rewound[n] = torch.where(m[n], w_new[n], w[n])
                    loss, acc = loss_acc(rewound)
                    overlap = float(sum((m[n] & gmask[n]).sum() for n in names)) / kk
                    rows.append(
                        {
                            **base,
                            "k": k,
                            "mask": name,
                            "loss_rewound": loss,
                            "acc_rewound": acc,
                            "overlap_with_global": overlap,
                        }
                    )
            args.out.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(args.out / "metrics.csv", index=False)  # after every measured round
            print(f"round {t}: measured", flush=True)
        # advance as GCPU at k = 0.05 (rewind): the trajectory every counterfactual starts from
        keep = topk_mask({n: c_g[n] for n in names}, num_updated(0.05, total))
        for k in w:
            w[k] = torch.where(keep[k], w_new[k], w[k]) if k in keep else w_new[k]
    args.out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(args.out / "metrics.csv", index=False)
    cols = ["round", "k", "mask", "loss_rewound", "acc_rewound", "overlap_with_global"]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    per_round = df.drop_duplicates("round")[
        [
            "round",
            "steps_Q",
            "signal_share",
            "noise_floor_1_over_Q",
            "spearman_cl_cg",
            "spearman_est_cg",
            "grad_norm_x_delta",
            "delta_sq",
            "loss_start",
            "loss_full",
            "acc_full",
        ]
    ]
    print(per_round.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
