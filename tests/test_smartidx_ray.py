"""SmartIdx end to end on Flower's simulation engine (Ray), at a tiny size."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from fedsparse import simulate
from fedsparse.smartidx import PACKAGES

TINY = {
    "strategy": "smartidx",
    "dataset": "fashion-mnist",
    "model": "lenet5",  # 5×5 kernels: SmartIdx's kernel packages apply to both convolutions
    "num-clients": 4,
    "clients-per-round": 2,
    "rounds": 2,
    "local-steps": 15,
    "batch-size": 32,
    "lr": 0.05,
    "eval-batch-size": 2500,
    "seed": 3,
    "compress-ratio": 0.1,
    "wire-bytes": False,
}


@pytest.mark.ray
def test_two_rounds_on_ray_send_packages_and_report_their_bytes(tmp_path: Path) -> None:
    df = simulate(TINY, out_dir=tmp_path, progress=False)
    assert df["failures"].sum() == 0 and df["rejected"].sum() == 0
    assert (df["compressor"] == "smartidx").all()
    parts = [f"smartidx_{p}_{q}" for p in PACKAGES for q in ("index", "value", "sign")]
    payload = df[parts].sum(axis=1) + df["smartidx_header"]
    # the payload arrays are the uplink minus each reply's npy headers, keys and metrics record
    assert (payload < df["bytes_up"]).all() and (payload > 0.8 * df["bytes_up"]).all()
    assert (df["smartidx_ip_index"] > 0).all()  # the FC layers fall back to individual packages
    # whole kernels and individual entries: more than the important 10 % is sent, far less than all
    assert df["uplink_nonzero_fraction"].between(0.1, 0.5).all()
    assert (df["comm_ratio_up"] < 0.2).all()
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert set(parts) <= set(rounds.columns)
    final = float(df["test_accuracy"].iloc[-1])
    assert math.isfinite(final) and final > 0.12  # two short compressed rounds beat chance (0.1): 0.1994 measured
