"""Reliability of training: killed mid-epoch (SIGKILL, no chance to save), it resumes from the
last checkpoint and ends with the same weights as an uninterrupted run; a damaged newest
checkpoint (flipped byte, truncated, or killed before its sha256 sidecar was written) is
detected and the previous one used, again with the same final weights.

test_train_resume.py (training engineer) covers Ctrl-C (which saves a checkpoint on the way
out) and the checkpoint module alone; this file adds the hard kill through a real process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import small_config, write_phantom_cases

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 8
KILL_AT = 5  # after the checkpoint of iteration 4, before the one of iteration 6

_KILLER = """
import json, os, signal, sys
from CascadeSegLib.train.config import parse_config
from CascadeSegLib.train.trainer import StageTrainer, train_run

data = json.loads(open(sys.argv[1]).read())
original = StageTrainer.step

def step(self):
    if self.iteration == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)   # the OOM killer / a power cut: no cleanup at all
    return original(self)

StageTrainer.step = step
train_run(parse_config(data, sys.argv[4]), sys.argv[2], progress=False, export=False)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from CascadeSegLib.train.config import parse_config
    from CascadeSegLib.train.trainer import train_run

    root = tmp_path_factory.mktemp("train")
    cases = write_phantom_cases(root / "data", seeds=[1], size=(32, 32, 24), spacing=(8.0, 8.0, 8.0))
    data = small_config(cases, train=["ph1"], val=[], iterations=ITERATIONS, patch=(16, 16, 16),
                        checkpoint_every=2, keep_checkpoints=3, optimizer="sgd", lr=0.01, momentum=0.9)
    data["augment"] = {"enabled": True, "elastic_max": 2.0, "translation_vox": 3.0, "extra_prob": 0.5,
                       "noise_std": 0.02}
    (root / "config.json").write_text(json.dumps(data))
    cfg = parse_config(data, root)
    threads = torch.get_num_threads()
    try:
        straight = train_run(cfg, root / "straight", progress=False, export=False)
    finally:
        torch.set_num_threads(threads)  # train_run sets the config's thread count process-wide
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    killed = root / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(root / "config.json"), str(killed), str(KILL_AT),
                           str(root)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    return cfg, straight, killed


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from CascadeSegLib.train import checkpoint as ckpt

    return ckpt.load_checkpoint(run / "stage1" / "best.pt")["model"]


@pytest.mark.parametrize("damage,resume_from", [
    (None, 4), ("flip", 2), ("truncate", 2), ("no_sidecar", 2)])
def test_killed_run_resumes_from_the_last_good_checkpoint_with_the_same_result(setup, tmp_path, monkeypatch,
                                                                               caplog, damage, resume_from):
    from CascadeSegLib.train import checkpoint as ckpt
    from CascadeSegLib.train.trainer import StageTrainer, train_run

    cfg, straight, killed = setup
    run = Path(shutil.copytree(killed, tmp_path / "run"))
    folder = run / "stage1" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["ckpt_0000004.pt", "ckpt_0000002.pt"]
    assert not (run / "stage1" / "done.json").exists()
    newest = folder / "ckpt_0000004.pt"
    if damage == "flip":
        data = bytearray(newest.read_bytes())
        data[len(data) // 3] ^= 0x01
        newest.write_bytes(bytes(data))
    elif damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:1000])
    elif damage == "no_sidecar":  # killed between writing the checkpoint and its checksum
        ckpt.sidecar(newest).unlink()

    resumed_at = []
    original = StageTrainer.load_state
    monkeypatch.setattr(StageTrainer, "load_state",
                        lambda self, state: (original(self, state), resumed_at.append(self.iteration)))
    threads = torch.get_num_threads()
    with caplog.at_level(logging.WARNING, logger="CascadeSegLib.train.checkpoint"):
        try:
            train_run(cfg, run, progress=False, export=False)
        finally:
            torch.set_num_threads(threads)
    assert resumed_at == [resume_from]
    skipped = [r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage()]
    assert len(skipped) == (0 if damage is None else 1)
    if damage:
        assert "ckpt_0000004.pt" in skipped[0]
    done = json.loads((run / "stage1" / "done.json").read_text(encoding="utf-8"))
    assert done["iterations"] == ITERATIONS
    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), atol=1e-5, rtol=1e-5, msg=k)
    # The log holds every iteration from the checkpoint on, once.
    assert _logged(run)[-(ITERATIONS - resume_from):] == list(range(resume_from + 1, ITERATIONS + 1))


def _logged(run: Path) -> list[int]:
    with open(run / "stage1" / "log.csv") as f:
        return [int(line.split(",")[0]) for line in f.read().splitlines()[1:]]


def test_log_keeps_every_iteration_after_a_kill(setup, tmp_path):
    from CascadeSegLib.train.trainer import train_run

    cfg, straight, killed = setup
    run = Path(shutil.copytree(killed, tmp_path / "run"))
    assert _logged(run)[:4] == [1, 2, 3, 4]  # on disk at the time of the kill: up to the checkpoint
    threads = torch.get_num_threads()
    try:
        train_run(cfg, run, progress=False, export=False)
    finally:
        torch.set_num_threads(threads)
    assert _logged(run) == _logged(straight) == list(range(1, ITERATIONS + 1))
