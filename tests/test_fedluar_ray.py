"""FedLUAR end to end on Flower's simulation engine (Ray): 2 rounds, clients omit the recycled layers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import ArrayRecord

from fedsparse import simulate
from fedsparse.config import resolve_config
from fedsparse.server import initial_model

RUN = {
    "strategy": "fedluar",
    "recycled-layers": 2,
    "persist-momentum": True,
    "momentum": 0.9,
    "model": "lenet5",
    "num-clients": 6,
    "clients-per-round": 3,
    "rounds": 2,
    "local-steps": 4,
    "batch-size": 32,
    "lr": 0.05,
    "partition": "dirichlet",
    "alpha": 0.5,
    "eval-batch-size": 2500,
    "seed": 7,
}


@pytest.mark.ray
def test_fedluar_two_rounds_on_ray(tmp_path: Path) -> None:
    df = simulate(RUN, out_dir=tmp_path, progress=False)
    assert df["failures"].sum() == 0 and (df["replies"] == 3).all()
    recycled = pd.read_csv(tmp_path / "rounds.csv", keep_default_na=False)["recycled_layers"].tolist()
    assert recycled[0] == ""  # round 1 aggregates everything
    layers = recycled[1].split(";")
    assert len(layers) == 2

    # uplink of round 2 = round 1 minus exactly the omitted arrays of 3 replies (measured bytes)
    init = ArrayRecord(initial_model(resolve_config(RUN)).state_dict())
    omitted = sum(len(init[k].data) + len(k) for k in layers)
    assert df["bytes_up"][1] == df["bytes_up"][0] - 3 * omitted
    assert df["wire_bytes_up"][1] < df["wire_bytes_up"][0]
    per_array = pd.read_csv(tmp_path / "layer_bytes.csv")
    up2 = per_array[(per_array["round"] == 2) & (per_array["direction"] == "up")]
    assert set(up2["array"]).isdisjoint(layers) and len(up2) == len(init.keys()) - 2
    assert df["comm_ratio_up"].iloc[-1] < 1.0

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sum(v["recycled"] for v in summary["luar_layers"].values()) == 2
    assert (tmp_path / "luar_layers.csv").is_file() and (tmp_path / "luar_layers.png").is_file()
    assert 0.0 <= df["test_accuracy"].iloc[-1] <= 1.0  # evaluated at the last round (2 rounds learn little)
