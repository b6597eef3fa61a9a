"""configs/train_prepared.py: pack here, train where SimpleITK is missing, export a working package.

The default model's networks were trained this way on a GPU machine without SimpleITK, so the
pack must hold what the trainer's own cache holds, the trainer must run with SimpleITK absent,
and stage 2's candidates must cover every labelled voxel.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from train_helpers import small_config, write_phantom_cases

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "configs" / "train_prepared.py"


def _module():
    spec = importlib.util.spec_from_file_location("train_prepared", SCRIPT)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_nearest_index_maps_stage_grids_exactly():
    tp = _module()
    coarse = {"size": [4, 3, 2], "spacing": [6.0, 6.0, 6.0], "origin": [1.5, 1.5, 1.5]}
    fine = {"size": [8, 6, 4], "spacing": [3.0, 3.0, 3.0], "origin": [0.0, 0.0, 0.0]}
    iz, iy, ix = tp._nearest_index(coarse, fine)
    # fine x positions 0, 3, ..., 21 mm -> (p - 1.5) / 6 = -0.25, 0.25, 0.75, ... rounded, clipped to 0..3
    assert ix.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert iy.tolist() == [0, 0, 1, 1, 2, 2]
    assert iz.tolist() == [0, 0, 1, 1]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    cases = write_phantom_cases(root / "data", seeds=(3, 4))
    cfg = small_config(cases, train=["ph3", "ph4"], val=[], iterations=3, norm="instance")
    stage2 = json.loads(json.dumps(cfg["stages"][0]))
    stage2.update(name="stage2", spacing=[3.0, 3.0, 3.0], tile=[32, 32, 32], patch=[24, 24, 24])
    cfg["stages"].append(stage2)
    path = root / "config.json"
    path.write_text(json.dumps(cfg))
    out = root / "pack"
    run = subprocess.run([sys.executable, str(SCRIPT), "pack", str(path), "-o", str(out), "--work", str(root / "work")],
                         capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr
    return root, out, cases


def test_pack_holds_the_trainers_cache(packed):
    from CascadeSegLib.train.config import parse_config
    from CascadeSegLib.train.dataset import build_cached_case, discover_cases, label_lookup

    root, out, _ = packed
    tp = _module()
    meta = json.loads((out / "pack.json").read_text())
    assert [e["name"] for e in meta["cases"]] == ["ph3", "ph4"] and meta["weights"] == [0.5, 0.5]
    cfg = parse_config(meta["config"], root)
    cases, names = discover_cases(cfg.data, cfg.resolve)
    table = label_lookup(cfg.label_set(), None, names)
    for stage in cfg.stages:
        ref = build_cached_case(cases[0], root / "check", stage.spacing, cfg.window, cfg.normalization,
                                cfg.body_threshold_hu, table)
        got = tp._load(out, stage.name, meta["cases"][0])
        assert got.image.shape == ref.image.shape
        assert np.abs(got.image.astype(np.float32) - np.asarray(ref.image, np.float32)).max() <= 0.5 / 255 + 1e-3
        assert np.array_equal(got.label, ref.label) and np.array_equal(got.c1, ref.c1)
        assert got.geometry["origin"] == ref.geometry["origin"] and got.geometry["spacing"] == ref.geometry["spacing"]
        assert got.geometry["direction"] == ref.geometry["direction"]


def test_stage2_candidates_cover_every_labelled_voxel(packed, tmp_path):
    from CascadeSegLib.inference import preprocess
    from CascadeSegLib.network import build_network
    from CascadeSegLib.train import checkpoint as ckpt
    from CascadeSegLib.train.config import parse_config

    root, out, _ = packed
    tp = _module()
    meta = json.loads((out / "pack.json").read_text())
    cfg = parse_config(meta["config"], root)
    # a stage 1 that finds nothing (background everywhere): the labelled voxels must still be candidates
    net = build_network(cfg.stages[0].network)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.head.bias[0] = 10.0
    (tmp_path / "stage1").mkdir()
    ckpt.save_checkpoint({"model": net.state_dict()}, tmp_path / "stage1" / "best.pt")
    cases, masks, _, _ = tp._stage_data(cfg, 1, out, meta, tmp_path, torch.device("cpu"))
    for case, mask in zip(cases, masks):
        label = np.asarray(case.label) > 0
        assert label.any() and mask[label].all()
        grown = torch.from_numpy(label)
        assert np.array_equal(mask, preprocess.dilate(grown, cfg.dilation_radius).numpy())


def test_train_without_simpleitk_then_export_segments(packed, tmp_path):
    root, out, cases = packed
    run_dir = tmp_path / "run"
    code = ("import sys, runpy; sys.modules['SimpleITK'] = None; "
            f"sys.argv = ['train_prepared.py', 'train', {str(out)!r}, '--run-dir', {str(run_dir)!r}, "
            "'--device', 'cpu', '--threads', '1']; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    for stage in ("stage1", "stage2"):
        done = json.loads((run_dir / stage / "done.json").read_text())
        assert done["iterations"] == 3
    model = tmp_path / "model"
    run = subprocess.run([sys.executable, str(SCRIPT), "export", str(run_dir), "-o", str(model)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr

    from CascadeSegLib.inference.cascade import Segmenter
    from CascadeSegLib.packaging.model import load_model

    pkg = load_model(str(model))
    assert [s.name for s in pkg.stages] == ["stage1", "stage2"]
    image = sitk.ReadImage(cases[0]["image"])
    labels = Segmenter(pkg, device="cpu").segment(image).labels
    assert labels.GetSize() == image.GetSize() and labels.GetOrigin() == image.GetOrigin()
    assert labels.GetSpacing() == image.GetSpacing() and labels.GetDirection() == image.GetDirection()


def test_all_runs_every_step_once_and_resumes(packed, tmp_path):
    """`all` packs, trains and exports; run again, it keeps the finished pack and stages."""
    root, _, cases = packed
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "all", str(root / "config.json"), "--run-dir", str(run_dir),
           "--work", str(root / "work"), "--device", "cpu", "--threads", "1", "--no-atlases"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    pack_json = run_dir / "pack" / "pack.json"
    done = {s: (run_dir / "networks" / s / "done.json") for s in ("stage1", "stage2")}
    stamps = {p: p.stat().st_mtime_ns for p in (pack_json, *done.values())}
    assert all(json.loads(p.read_text())["iterations"] == 3 for p in done.values())

    second = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "is complete, kept" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps        # nothing packed or trained twice

    from CascadeSegLib.packaging.model import load_model

    pkg = load_model(str(run_dir / "networks" / "model"))
    assert [s.name for s in pkg.stages] == ["stage1", "stage2"] and pkg.atlas_prior is None
    assert pkg.labels.names == json.loads((root / "config.json").read_text())["labels"]


def _train(pack, run_dir, *extra, cwd):
    cmd = [sys.executable, str(SCRIPT), "train", str(pack), "--run-dir", str(run_dir), "--device", "cpu",
           "--threads", "1"]
    return subprocess.run([*cmd, *map(str, extra)], capture_output=True, text=True, cwd=cwd)


def test_train_from_a_model_starts_from_its_weights(packed, tmp_path):
    """--init: each stage starts from the package's weights (a near-zero learning rate keeps them),
    the provenance reaches the new package, and a run is never resumed from another model."""
    _, out, _ = packed
    first = _train(out, tmp_path / "a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    subprocess.run([sys.executable, str(SCRIPT), "export", str(tmp_path / "a"), "-o", str(tmp_path / "model-a")],
                   check=True, capture_output=True, cwd=tmp_path)
    tuned = _train(out, tmp_path / "b", "--init", tmp_path / "model-a", "--lr-factor", "1e-9", "--iterations", 2, 2,
                   "--warmup", 0, cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    subprocess.run([sys.executable, str(SCRIPT), "export", str(tmp_path / "b"), "-o", str(tmp_path / "model-b")],
                   check=True, capture_output=True, cwd=tmp_path)

    from CascadeSegLib.packaging.model import load_model

    a, b = load_model(str(tmp_path / "model-a")), load_model(str(tmp_path / "model-b"))
    for i in range(2):
        assert json.loads((tmp_path / "b" / f"stage{i + 1}" / "done.json").read_text())["iterations"] == 2
        sa, sb = a.load_network(i).state_dict(), b.load_network(i).state_dict()
        assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    origin = json.loads((tmp_path / "b" / "config.json").read_text())["finetuned_from"]
    assert origin["sha256"] == {s.name: s.sha256 for s in a.stages} and origin["lr_factor"] == 1e-9
    assert b.provenance["finetuned_from"] == origin          # the package says where it started
    # the same from scratch differs: the weights above came from model-a, not from the seed
    scratch = _train(out, tmp_path / "c", "--iterations", 2, 2, cwd=tmp_path)
    assert scratch.returncode == 0, scratch.stderr[-2000:]
    subprocess.run([sys.executable, str(SCRIPT), "export", str(tmp_path / "c"), "-o", str(tmp_path / "model-c")],
                   check=True, capture_output=True, cwd=tmp_path)
    sa, sc = a.load_network(0).state_dict(), load_model(str(tmp_path / "model-c")).load_network(0).state_dict()
    assert not all(torch.allclose(sa[k], sc[k], atol=1e-3) for k in sa)

    bare = _train(out, tmp_path / "b", cwd=tmp_path)            # resumed without --init: refused
    assert bare.returncode == 2 and "give the same --init" in bare.stderr
    lone = _train(out, tmp_path / "d", "--lr-factor", 0.5, cwd=tmp_path)
    assert lone.returncode == 2 and "give --init MODEL" in lone.stderr
    other = _train(out, tmp_path / "b", "--init", tmp_path / "model-b", cwd=tmp_path)
    assert other.returncode == 2 and "was started from another model" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    # `all --keep-init-stage stage1`: stage 1 exported as the starting package had it, stage 2 fine-tuned
    root = out.parent
    cmd = [sys.executable, str(SCRIPT), "all", str(root / "config.json"), "--run-dir", str(tmp_path / "e"), "--work",
           str(root / "work"), "--device", "cpu", "--threads", "1", "--no-atlases", "--init", str(tmp_path / "model-a"),
           "--lr-factor", "1", "--iterations", 2, 2]
    kept = subprocess.run([*map(str, cmd), "--keep-init-stage", "stage1"], capture_output=True, text=True, cwd=tmp_path)
    assert kept.returncode == 0, kept.stderr[-2000:]
    e = load_model(str(tmp_path / "e" / "networks" / "model"))
    e.verify()
    s1, s2 = e.load_network(0).state_dict(), e.load_network(1).state_dict()
    assert all(torch.equal(s1[k], sa[k]) for k in sa)
    a2 = a.load_network(1).state_dict()
    assert not all(torch.allclose(s2[k], a2[k], atol=1e-6) for k in a2)
    assert e.provenance["stages_from_init"] == {"stage1": a.stages[0].sha256}
    lonely = subprocess.run([*map(str, cmd[:-7]), "--keep-init-stage", "stage1"], capture_output=True, text=True)
    assert lonely.returncode == 2 and "needs --init MODEL" in lonely.stderr
    typo_run = [*map(str, cmd), "--keep-init-stage", "stage3"]
    typo_run[typo_run.index(str(tmp_path / "e"))] = str(tmp_path / "f")
    typo = subprocess.run(typo_run, capture_output=True, text=True)
    assert typo.returncode == 2 and f"model {a.name} has the stages stage1, stage2" in typo.stderr
    assert not (tmp_path / "f").exists()                                # refused before packing or training
    bad = _train(out, tmp_path / "d", "--iterations", 5, cwd=tmp_path)
    assert bad.returncode == 2 and "one count >= 1 per stage" in bad.stderr


def test_a_second_run_with_another_seed_differs_and_keeps_its_seed(packed, tmp_path):
    """--seed: another seed trains other weights from the same pack, the run records its seed and
    keeps it when resumed without --seed, and another seed on the same run is refused."""
    _, out, _ = packed
    runs = {}
    for name, extra in (("default", ()), ("seed0", ("--seed", 0)), ("seed5", ("--seed", 5))):
        proc = _train(out, tmp_path / name, "--iterations", 2, 2, *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = torch.load(sorted((tmp_path / name / "stage1" / "checkpoints").glob("*.pt"))[-1],
                                map_location="cpu", weights_only=True)["model"]
    config = json.loads((tmp_path / "seed5" / "config.json").read_text())["config"]   # the effective config
    assert config["train"]["seed"] == 5 and json.loads((tmp_path / "seed5" / "seed.json").read_text()) == {"seed": 5}
    assert not (tmp_path / "default" / "seed.json").exists()
    same, other = runs["default"], runs["seed5"]
    assert all(torch.equal(same[k], runs["seed0"][k]) for k in same)      # the config's seed is 0
    assert not all(torch.allclose(same[k], other[k], atol=1e-4) for k in same)
    again = _train(out, tmp_path / "seed5", "--iterations", 3, 2, cwd=tmp_path)    # resumed: seed 5 kept
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "seed5" / "config.json").read_text())["config"]["train"]["seed"] == 5
    refused = _train(out, tmp_path / "seed5", "--seed", 6, cwd=tmp_path)
    assert refused.returncode == 2 and "was started with --seed 5" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    begun = _train(out, tmp_path / "default", "--seed", 5, cwd=tmp_path)      # begun with the config's seed
    assert begun.returncode == 2 and "was started with --seed 0" in begun.stderr


def test_a_finished_run_trains_further_in_a_later_sitting(packed, tmp_path):
    """--iterations above a finished run's counts: each stage goes on from its checkpoint (the
    first iterations' log is kept, not retrained), the re-exported networks differ, and the fused
    package built on the old ones is recognised as stale; fewer iterations are refused."""
    _, out, _ = packed
    run = tmp_path / "run"
    first = _train(out, run, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    subprocess.run([sys.executable, str(SCRIPT), "export", str(run), "-o", str(tmp_path / "short")],
                   check=True, capture_output=True, cwd=tmp_path)
    log3 = (run / "stage1" / "log.csv").read_text().splitlines()
    same = _train(out, run, "--iterations", 3, 3, cwd=tmp_path)       # as many: nothing to do
    assert same.returncode == 0 and "extending" not in same.stdout
    more = _train(out, run, "--iterations", 5, 4, cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-2000:]
    assert "stage1: extending from 3 to 5 iterations" in more.stdout
    for stage, n in (("stage1", 5), ("stage2", 4)):
        assert json.loads((run / stage / "done.json").read_text())["iterations"] == n
        assert json.loads((run / stage / "done-3.json").read_text())["iterations"] == 3
        rows = (run / stage / "log.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, n + 1)]
    assert (run / "stage1" / "log.csv").read_text().splitlines()[:4] == log3[:4]   # resumed, not restarted
    assert json.loads((run / "fitted.json").read_text()) == {"stage1": 5, "stage2": 4}
    subprocess.run([sys.executable, str(SCRIPT), "export", str(run), "-o", str(tmp_path / "long")],
                   check=True, capture_output=True, cwd=tmp_path)
    subprocess.run([sys.executable, str(SCRIPT), "export", str(run), "-o", str(tmp_path / "again")],
                   check=True, capture_output=True, cwd=tmp_path)
    tp = _module()
    assert tp._same_networks(tmp_path / "again", tmp_path / "long")    # exported twice: the same weights
    assert not tp._same_networks(tmp_path / "short", tmp_path / "long")
    fewer = _train(out, run, "--iterations", 4, 4, cwd=tmp_path)
    assert fewer.returncode == 2 and "stage1 has trained 5 iterations" in fewer.stderr
    assert len(fewer.stderr.strip().splitlines()) == 1


def test_default_model_recipes_hold_the_slab_out_and_the_shipped_networks_name_theirs():
    """The configs that retrained the default model: every file they name is in the repo, the
    DICOM slab is never among them, the fine-tune's pack adds label maps to the first one's and
    keeps its stages, the 7-map recipe (2.13.0) trains the fine-tune's data from scratch at the
    first one's counts, and the shipped package says it came from that recipe, with those counts."""
    from CascadeSegLib.packaging.model import load_model
    from CascadeSegLib.train.config import parse_config, read_config_file

    paths = [REPO / "configs" / f"abdomen-ct-networks{s}.json" for s in ("", "-finetune", "-7maps")]
    first, tune, seven = (parse_config(read_config_file(p), p.parent) for p in paths)
    for cfg in (first, tune, seven):
        data = cfg.raw["data"]
        named = [c[k] for c in data["cases"] for k in ("image", "label")] + data["synthetic"]["label_maps"]
        assert all(cfg.resolve(n).is_file() for n in named)
        assert not any("dicom_slab" in str(n) for n in named)
    old, new = (c.raw["data"]["synthetic"]["label_maps"] for c in (first, tune))
    assert new[:len(old)] == old and {Path(n).name for n in new[len(old):]} == {"s0327_label.nii.gz",
                                                                                  "s0328_label.nii.gz"}
    assert seven.raw["data"] == tune.raw["data"]
    assert [(s.name, s.spacing, s.tile, s.network, s.train.iterations) for s in first.stages] == \
        [(s.name, s.spacing, s.tile, s.network, s.train.iterations) for s in seven.stages]
    assert [(s.name, s.spacing, s.tile, s.network) for s in first.stages] == \
        [(s.name, s.spacing, s.tile, s.network) for s in tune.stages]
    shipped = load_model(str(REPO / "Resources" / "Models" / "abdomen-ct"))
    network = shipped.provenance["network"]
    assert network["model"] == f"{shipped.name} {seven.version}"   # the networks' version
    assert "abdomen-ct-networks-7maps.json" in network["command"] and "--init" not in network["command"]
    assert "finetuned_from" not in network
    assert [network["training"][s.name]["iterations"] for s in seven.stages] == \
        [s.train.iterations for s in seven.stages]
    assert [(s.name, tuple(s.spacing), s.network.to_json()) for s in shipped.stages] == \
        [(s.name, tuple(s.spacing), s.network.to_json()) for s in seven.stages]


def test_sigterm_stops_a_background_run_with_a_checkpoint_it_resumes_from(packed, tmp_path):
    """A run started in a script's background ignores SIGINT; `kill` (SIGTERM) must still save the
    iteration it reached, not lose everything since the last periodic checkpoint."""
    import signal
    import time

    from CascadeSegLib.train.checkpoint import latest_valid

    _, out, _ = packed
    run = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "train", str(out), "--run-dir", str(run), "--device", "cpu",
           "--threads", "1", "--iterations", "100000", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    log = run / "stage1" / "log.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) > 11:        # flushed every 10 iterations
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else ""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == ("interrupted; run the same command again to go on (a stage in "
                                           "training saved a checkpoint first)")
    saved = latest_valid(run / "stage1" / "checkpoints")
    assert saved is not None
    reached = int(saved[1]["iteration"])
    assert reached >= 10 and reached % 250 != 0 and not (run / "stage1" / "done.json").exists()
    # `cascadeseg train-status` reads where the stopped run stands from its folder alone.
    stopped = _status(run)
    assert [s["name"] for s in stopped] == ["stage1", "stage2"]
    one, two = stopped
    assert (one["planned"], one["logged"], one["checkpoint"], one["finished"]) == (100000, reached, reached, False)
    assert one["seconds_per_iteration"] > 0 and one["remaining_seconds"] == pytest.approx(
        (100000 - reached) * one["seconds_per_iteration"], rel=1e-3)
    assert (two["planned"], two["logged"], two["checkpoint"], two["finished"]) == (3, 0, None, False)
    cut = Path(shutil.copytree(run, tmp_path / "cut"))
    with open(cut / "stage1" / "log.csv", "a") as f:          # a power cut left half a row
        f.write(f"{reached + 1}0,0.9")
    assert _status(cut)[0] == one
    with open(run / "stage1" / "log.csv", "a") as f:          # the same on the run a resume reads
        f.write("1")
    again = _train(out, run, "--iterations", reached + 2, 3, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = (run / "stage1" / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, reached + 3))     # went on, not restarted
    assert json.loads((run / "stage1" / "done.json").read_text())["iterations"] == reached + 2
    assert [(s["planned"], s["finished"], s["remaining_seconds"]) for s in _status(run)] == [
        (reached + 2, True, 0.0), (3, True, 0.0)]
    text = subprocess.run([sys.executable, "-m", "CascadeSegLib", "train-status", str(run)], capture_output=True,
                          text=True)
    assert text.returncode == 0 and text.stdout.splitlines()[1:] == [f"stage1: done, {reached + 2} iterations",
                                                                     "stage2: done, 3 iterations"]
    wrong = subprocess.run([sys.executable, "-m", "CascadeSegLib", "train-status", str(tmp_path)], capture_output=True,
                           text=True)
    assert wrong.returncode == 2 and wrong.stderr.strip() == (
        f"cascadeseg: error: {tmp_path} is not a training run folder (no config.json in it or in "
        f"{tmp_path / 'networks'}); pass the --run-dir the run was started with")


def _status(run: Path) -> list[dict]:
    res = subprocess.run([sys.executable, "-m", "CascadeSegLib", "train-status", str(run), "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["run_dir"] == str(run)
    return doc["stages"]
