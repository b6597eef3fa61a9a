"""Checkpoints: an interrupted run resumes at the same step with the same optimizer and RNG
state and ends with the weights of an uninterrupted run; damaged checkpoints are skipped."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from train_helpers import small_config, write_phantom_cases


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory):
    return write_phantom_cases(tmp_path_factory.mktemp("data"), seeds=[1], size=(32, 32, 24), spacing=(8.0, 8.0, 8.0))


def _config(cases, tmp_path):
    from CascadeSegLib.train.config import parse_config

    data = small_config(cases, train=["ph1"], val=[], iterations=6, patch=(16, 16, 16), checkpoint_every=2,
                        keep_checkpoints=5, optimizer="sgd", lr=0.01, momentum=0.9)
    data["augment"] = {"enabled": True, "elastic_max": 2.0, "translation_vox": 3.0, "extra_prob": 0.5,
                       "noise_std": 0.02, "gamma": 0.2}      # the RNG streams must continue too
    return parse_config(data, tmp_path)


def _interrupted_run(cfg, run, monkeypatch, at: int, after_step: bool = False) -> None:
    """Train `cfg` in `run` until a KeyboardInterrupt at iteration `at` (after that step with `after_step`)."""
    from CascadeSegLib.train.trainer import StageTrainer, train_run

    original_step = StageTrainer.step

    def interrupted_step(self):
        if self.iteration == at:
            if after_step:
                original_step(self)
            raise KeyboardInterrupt
        return original_step(self)

    monkeypatch.setattr(StageTrainer, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, run, progress=False, export=False)
    monkeypatch.undo()


@pytest.mark.parametrize("after_step", [False, True], ids=["during-a-step", "after-a-step-before-its-log-row"])
def test_resume_continues_from_the_same_step(phantom_cases, tmp_path, monkeypatch, after_step):
    from CascadeSegLib.train import checkpoint as ckpt
    from CascadeSegLib.train.trainer import StageTrainer, train_run

    cfg = _config(phantom_cases, tmp_path)
    straight = train_run(cfg, tmp_path / "a", progress=False, export=False)

    # Ctrl-C or `kill` lands during the fourth step, or after it but before the loop logs it.
    _interrupted_run(cfg, tmp_path / "b", monkeypatch, at=3, after_step=after_step)
    reached = 4 if after_step else 3
    folder = tmp_path / "b" / "stage1" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(folder)] == [f"ckpt_000000{reached}.pt", "ckpt_0000002.pt"]
    saved = ckpt.load_checkpoint(folder / f"ckpt_000000{reached}.pt")
    assert saved["iteration"] == reached
    with open(tmp_path / "b" / "stage1" / "log.csv") as f:      # the log reaches the checkpoint
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == list(range(1, reached + 1))

    seen = {}
    original_load = StageTrainer.load_state

    def spy_load(self, state):
        original_load(self, state)
        seen["iteration"] = self.iteration
        seen["optimizer"] = copy.deepcopy(self.opt.state_dict())

    monkeypatch.setattr(StageTrainer, "load_state", spy_load)
    resumed = train_run(cfg, tmp_path / "b", progress=False, export=False)
    assert seen["iteration"] == reached
    for key, state in saved["optimizer"]["state"].items():
        assert torch.equal(seen["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"])

    a = ckpt.load_checkpoint(straight / "stage1" / "best.pt")["model"]
    b = ckpt.load_checkpoint(resumed / "stage1" / "best.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    start = ckpt.load_checkpoint(folder / "ckpt_0000002.pt")["model"]
    assert any(not torch.equal(start[k], b[k]) for k in b)          # training did change the weights
    with open(resumed / "stage1" / "log.csv") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


def test_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    from CascadeSegLib.train import checkpoint as ckpt

    for it in (2, 4):
        ckpt.save_checkpoint({"iteration": it, "w": torch.full((3,), float(it))}, tmp_path / f"ckpt_{it:07d}.pt")
    path, state = ckpt.latest_valid(tmp_path)
    assert path.name == "ckpt_0000004.pt" and state["iteration"] == 4
    data = bytearray((tmp_path / "ckpt_0000004.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "ckpt_0000004.pt").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_checkpoint(tmp_path / "ckpt_0000004.pt")
    path, state = ckpt.latest_valid(tmp_path)
    assert path.name == "ckpt_0000002.pt" and state["iteration"] == 2
    (tmp_path / "ckpt_0000002.pt.sha256").unlink()                   # no sidecar: not trusted either
    assert ckpt.latest_valid(tmp_path) is None


def test_a_kill_at_the_resume_leaves_the_log_whole(phantom_cases, tmp_path, monkeypatch):
    """The resume rewrites log.csv up to its checkpoint; interrupted while doing so, the log keeps
    every row it had (it was truncated first, before)."""
    from CascadeSegLib.train.trainer import train_run

    cfg = _config(phantom_cases, tmp_path)
    _interrupted_run(cfg, tmp_path / "run", monkeypatch, at=4)
    log = tmp_path / "run" / "stage1" / "log.csv"
    before = log.read_bytes()
    assert [int(r["iteration"]) for r in csv.DictReader(before.decode().splitlines())] == [1, 2, 3, 4]

    def killed_rows(self, rows):
        raise KeyboardInterrupt               # Ctrl-C while the kept rows are being written

    monkeypatch.setattr(csv.DictWriter, "writerows", killed_rows)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "run", progress=False, export=False)
    monkeypatch.undo()
    assert log.read_bytes() == before
    train_run(cfg, tmp_path / "run", progress=False, export=False)
    with open(log) as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


class _PowerCut(Exception):
    """The machine goes away mid-step: nothing catches it, so no checkpoint is saved on the way out."""


@pytest.mark.parametrize("minutes", [1e-9, 0.0], ids=["timed-checkpoints", "off"])
def test_timed_checkpoints_bound_what_an_unannounced_stop_loses(phantom_cases, tmp_path, monkeypatch, minutes):
    """`checkpoint_minutes` saves between the `checkpoint_every` ones (a CPU stage-2 step is ~18 s, so 250
    iterations are 75 min): a sitting that ends without warning resumes from the last timed save and
    still ends with the uninterrupted run's weights. 1e-9 minutes: every step is past due."""
    from CascadeSegLib.train import checkpoint as ckpt
    from CascadeSegLib.train.config import parse_config
    from CascadeSegLib.train.trainer import StageTrainer, train_run

    data = small_config(phantom_cases, train=["ph1"], val=[], iterations=6, patch=(16, 16, 16), checkpoint_every=100,
                        checkpoint_minutes=minutes, keep_checkpoints=10, optimizer="sgd", lr=0.01, momentum=0.9)
    cfg = parse_config(data, tmp_path)
    straight = train_run(cfg, tmp_path / "a", progress=False, export=False)
    original_step = StageTrainer.step

    def cut_step(self):
        if self.iteration == 4:
            raise _PowerCut
        return original_step(self)

    monkeypatch.setattr(StageTrainer, "step", cut_step)
    with pytest.raises(_PowerCut):
        train_run(cfg, tmp_path / "b", progress=False, export=False)
    monkeypatch.undo()
    folder = tmp_path / "b" / "stage1" / "checkpoints"
    kept = sorted(ckpt.load_checkpoint(p)["iteration"] for p in ckpt.list_checkpoints(folder))
    assert kept == ([1, 2, 3, 4] if minutes else [])
    starts = []
    original_load = StageTrainer.load_state

    def spy_load(self, state):
        original_load(self, state)
        starts.append(self.iteration)

    monkeypatch.setattr(StageTrainer, "load_state", spy_load)
    resumed = train_run(cfg, tmp_path / "b", progress=False, export=False)
    assert starts == ([4] if minutes else [])
    a = ckpt.load_checkpoint(straight / "stage1" / "best.pt")["model"]
    b = ckpt.load_checkpoint(resumed / "stage1" / "best.pt")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_checkpoint_minutes_below_zero_is_refused(phantom_cases, tmp_path):
    from CascadeSegLib.errors import UserError
    from CascadeSegLib.train.config import parse_config

    data = small_config(phantom_cases, train=["ph1"], val=[], checkpoint_minutes=-1)
    with pytest.raises(UserError, match=r"train.checkpoint_minutes must be >= 0 \(0 = off\), got -1"):
        parse_config(data, tmp_path)
