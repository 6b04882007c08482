"""FedDIP end to end on Flower's simulation engine (Ray backend): 2 rounds, 4 clients, 2 per round."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import fedsparse
from fedsparse.schedules import incremental_lambda


@pytest.mark.ray
def test_feddip_two_rounds_on_ray(tmp_path: Path) -> None:
    cfg = {
        "strategy": "feddip",
        "num-clients": 4,
        "clients-per-round": 2,
        "rounds": 2,
        "local-steps": 5,
        "batch-size": 32,
        "reconfig-every": 5,  # round 2 is the schedule's last round: pruned to s_p anyway
        "initial-sparsity": 0.5,
        "target-sparsity": 0.9,
        "lambda-steps": 4,
        "client-cpus": 1,
        "seed": 1,
    }
    df = fedsparse.simulate(cfg, out_dir=tmp_path, progress=False)
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert len(rounds) == 2 and (rounds["replies"] == 2).all() and (rounds["failures"] == 0).all()
    for col in ("sparsity", "lambda", "target_sparsity", "reconfigured"):
        assert col in rounds.columns
    # eq. 9 with T = 2, Q = 4 at the 0-based round index t = τ − 1: λ_max·⌊tQ/T⌋/Q, so round 1 (t = 0)
    # is unregularised and round 2 (t = 1) has λ_max·2/4
    assert list(rounds["lambda"]) == [incremental_lambda(t - 1, 2, 1e-3, 4) for t in (1, 2)] == [0.0, 5e-4]
    # the default first mask: round 1 trains dense, its aggregate is magnitude-pruned within ERK's
    # budgets (round 1 "reconfigured"), and round 2 (the schedule's last) prunes to s_p
    assert list(rounds["reconfigured"]) == [True, True]
    # the measured bytes: round 1 is dense (about FedAvg's; comm_ratio_* are cumulative), round 2's
    # downlink and uplink are sparse
    assert rounds["comm_ratio_down"].iloc[0] >= 0.99 and rounds["comm_ratio_up"].iloc[0] >= 0.99
    for way in ("down", "up"):
        assert rounds[f"bytes_{way}"].iloc[1] < 0.6 * rounds[f"bytes_{way}"].iloc[0]
    assert rounds["mask_sparsity"].iloc[0] == pytest.approx(0.5, abs=1e-4)
    # the final global model has exactly the target sparsity over the prunable weights
    assert rounds["sparsity"].iloc[-1] == pytest.approx(0.9, abs=1e-4)
    assert rounds["test_accuracy"].notna().iloc[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_sparsity"] == pytest.approx(0.9, abs=1e-4)
    layers = pd.read_csv(tmp_path / "feddip_layer_sparsity.csv")
    assert len(layers) == 5
    assert df["round"].tolist() == [1, 2]
