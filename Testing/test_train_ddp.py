"""torchrun with 2 CPU processes (gloo): training runs and both ranks end with identical weights."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import torch
from train_helpers import small_config, write_phantom_cases


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path):
    cases = write_phantom_cases(tmp_path / "data", seeds=[1, 2], size=(32, 32, 24), spacing=(8.0, 8.0, 8.0))
    data = small_config(cases, train=["ph1"], val=["ph2"], iterations=4, patch=(16, 16, 16), val_every=2,
                        save_rank_weights=True, norm="batch")
    data["augment"] = {"enabled": True, "elastic_max": 2.0, "translation_vox": 3.0}
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(data))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "CascadeSegLib.train", str(cfg_path), "--run-dir", str(run), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(run / "stage1" / "rank0_final.pt", weights_only=True)
    r1 = torch.load(run / "stage1" / "rank1_final.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k                       # parameters and BatchNorm statistics
    torch.manual_seed(0)
    from CascadeSegLib.network import NetConfig, build_network

    init = build_network(NetConfig(**{**data["stages"][0]["network"], "num_classes": 5})).state_dict()
    assert any(not torch.equal(init[k], r0[k]) for k in r0 if k.endswith("weight"))
    with open(run / "stage1" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    assert rows[1]["val_mean_dice"] != ""                          # rank 0 validated, nobody hung
    assert (run / "model" / "model.json").is_file()
