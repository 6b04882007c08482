"""Partial-update broadcast end to end on Flower's simulation engine (Ray), at a tiny size."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from flwr.app import ArrayRecord

from fedsparse import simulate
from fedsparse.accounting import dense_model_bytes
from fedsparse.config import resolve_config
from fedsparse.server import initial_model
from strategies.partial_update import num_updated

TINY = {
    "strategy": "partial-update",
    "dataset": "mnist",
    "model": "mlp",
    "num-clients": 3,
    "clients-per-round": 2,  # two of three: some client is sampled in both rounds
    "rounds": 2,
    "local-steps": 10,
    "batch-size": 32,
    "lr": 0.05,
    "eval-batch-size": 2500,
    "seed": 1,
    "update-ratio": 0.01,
    "contribution": "combined",
}


@pytest.mark.ray
def test_two_rounds_on_ray_send_sparse_patches_to_persistent_client_copies(tmp_path: Path) -> None:
    df = simulate(TINY, out_dir=tmp_path, progress=False)
    assert df["failures"].sum() == 0  # every client's patched copy passed the server's digest check
    cfg = resolve_config(TINY)
    dense = dense_model_bytes(ArrayRecord(initial_model(cfg).state_dict()))
    partial = 784 * 512 + 512 * 512 + 512 * 10

    # round 1: first contact rebuilds the initial model from the seed; nothing but config goes down
    assert df.loc[0, "patch_kinds"] == "empty:2"
    assert df.loc[0, "bytes_down"] < 0.01 * dense
    # round 2: a client from round 1 gets the fresh sparse change, applied to the copy it kept in
    # its Flower context state; the other the change since version 0
    assert "fresh:" in df.loc[1, "patch_kinds"]
    assert df.loc[1, "bytes_down"] < 2 * 0.05 * dense
    assert (df["updated_weights"] == num_updated(0.01, partial)).all()
    assert (df["partial_weights"] == partial).all()
    assert (df["k"] == 0.01).all()
    # measured index bytes are of the order of the i.i.d. Shannon bound I·H(k)/8 (DPU's masks are
    # not i.i.d., so the bound is a reference, not a floor); values dominate the patch either way
    row = df.loc[1]
    assert 0.5 < row["index_bytes_down"] / row["shannon_index_bytes"] < 1.5
    assert 0.8 < row["patch_bytes_down"] / row["shannon_bound_bytes"] < 1.2
    assert row["patch_bytes_down"] < row["bytes_down"]  # + the config records
    assert set(df.loc[1, "index_kinds"].replace(";", ":").split(":")[::2]) <= {"bitmap", "coords", "golomb"}
    # downlink ratio against dense FedAvg for the same clients; combined's local term is estimated
    # on the server (local-metric = server), so the uplink is the model alone
    assert df["comm_ratio_down"].iloc[-1] < 0.05
    assert df["comm_ratio_up"].iloc[-1] <= 1.02
    assert df["test_accuracy"].iloc[-1] > 0.3
    on_disk = pd.read_csv(tmp_path / "rounds.csv")
    for column in ("k", "updated_weights", "bytes_down", "shannon_bound_bytes", "comm_ratio_down"):
        assert column in on_disk.columns
    layers = pd.read_csv(tmp_path / "layer_bytes.csv")
    assert not layers["array"].str.startswith("contribution/").any()


@pytest.mark.ray
def test_finetuning_round_on_ray_sends_only_the_selected_values_up(tmp_path: Path) -> None:
    """after-broadcast = finetune on the Ray engine: round 1 trains in full, round 2 fine-tunes the
    k·I selected weights (their values alone travel up), round 3 trains in full again."""
    df = simulate({**TINY, "rounds": 3, "after-broadcast": "finetune"}, out_dir=tmp_path, progress=False)
    assert df["failures"].sum() == 0 and df["rejected"].sum() == 0
    assert list(df["phase"]) == ["train", "finetune", "train"]
    cfg = resolve_config(TINY)
    dense = dense_model_bytes(ArrayRecord(initial_model(cfg).state_dict()))
    assert df.loc[1, "bytes_up"] < 0.1 * dense * df.loc[1, "replies"]  # k = 0.01: values + biases
    assert df.loc[0, "bytes_up"] > 0.99 * dense * df.loc[0, "replies"]
    assert df.loc[1, "updated_weights"] <= num_updated(0.01, 784 * 512 + 512 * 512 + 512 * 10)
    assert df["test_accuracy"].iloc[-1] > 0.3
