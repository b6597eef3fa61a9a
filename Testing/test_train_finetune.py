"""Fine-tuning keeps every weight of the source model except a replaced output layer."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from train_helpers import ORGANS, small_config, write_phantom_cases


@pytest.fixture(scope="module")
def source_model(tmp_path_factory):
    from CascadeSegLib.labels import LabelSet
    from CascadeSegLib.network import NetConfig, build_network
    from CascadeSegLib.packaging.model import ModelPackage, StageSpec

    folder = tmp_path_factory.mktemp("src")
    cfg = NetConfig(kind="padded", num_classes=len(ORGANS) + 1, base_channels=4, depth=3, norm="batch")
    torch.manual_seed(42)
    net = build_network(cfg)
    pkg = ModelPackage(name="src", version="0.1", labels=LabelSet.from_names(ORGANS),
                       stages=[StageSpec("stage1", (8.0, 8.0, 8.0), (32, 32, 24), cfg, "stage1.pt")])
    pkg.save(folder, [net.state_dict()])
    return folder, net.state_dict()


def _finetune_config(tmp_path, labels, iterations, **train):
    cases = write_phantom_cases(tmp_path / "data", seeds=[1], size=(32, 32, 24), spacing=(8.0, 8.0, 8.0),
                                organs=("liver", "spleen", "pancreas", "kidney_right", "kidney_left"))
    data = small_config(cases, train=["ph1"], val=[], iterations=iterations, organs=labels, **train)
    data["stages"] = [{"name": "stage1", "patch": [16, 16, 16]}]        # the rest comes from the model
    data.pop("intensity")
    path = tmp_path / "ft.json"
    path.write_text(json.dumps(data))
    return path


def test_new_label_set_replaces_only_the_output_layer(source_model, tmp_path):
    from CascadeSegLib.packaging.model import ModelPackage
    from CascadeSegLib.train.finetune import finetune_run

    folder, old = source_model
    labels = ["liver", "spleen", "pancreas"]          # kidneys dropped, pancreas new
    cfg = _finetune_config(tmp_path, labels, iterations=0)
    run = finetune_run(folder, cfg, run_dir=tmp_path / "run", progress=False)
    pkg = ModelPackage.load(run / "model")
    assert pkg.labels.names == labels and pkg.stages[0].network.num_classes == 4
    assert pkg.stages[0].spacing == (8.0, 8.0, 8.0) and pkg.provenance["finetuned_from"]["name"] == "src"
    new = pkg.load_network(0).state_dict()
    for k in old:
        if not k.startswith("head."):
            assert torch.equal(new[k], old[k]), k
    assert new["head.weight"].shape[0] == 4 and old["head.weight"].shape[0] == 5
    # Background, liver and spleen keep their trained rows; pancreas gets a fresh one.
    for new_row, old_row in ((0, 0), (1, 1), (2, 2)):
        assert torch.equal(new["head.weight"][new_row], old["head.weight"][old_row])
    assert not any(torch.equal(new["head.weight"][3], old["head.weight"][r]) for r in range(5))


def test_frozen_encoder_and_ten_times_smaller_learning_rate(source_model, tmp_path):
    from CascadeSegLib.train import checkpoint as ckpt
    from CascadeSegLib.train.finetune import finetune_run

    folder, old = source_model
    cfg = _finetune_config(tmp_path, list(ORGANS), iterations=2, schedule="constant", lr=0.05)
    run = finetune_run(folder, cfg, run_dir=tmp_path / "run", freeze_encoder=True, progress=False, export=False)
    new = ckpt.load_checkpoint(run / "stage1" / "best.pt")["model"]
    for k in old:
        if k.startswith("encoders."):
            assert torch.equal(new[k], old[k]), k          # weights and BatchNorm statistics
    assert any(not torch.equal(new[k], old[k]) for k in old if k.startswith("decoders."))
    with open(run / "stage1" / "log.csv") as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == pytest.approx([0.005, 0.005])


def test_config_may_not_change_the_models_geometry(source_model, tmp_path):
    from CascadeSegLib.errors import UserError
    from CascadeSegLib.train.finetune import finetune_run

    folder, _ = source_model
    cfg = _finetune_config(tmp_path, list(ORGANS), iterations=0)
    data = json.loads(cfg.read_text(encoding="utf-8"))
    data["stages"][0]["spacing"] = [3, 3, 3]
    cfg.write_text(json.dumps(data))
    with pytest.raises(UserError, match="come from the model"):
        finetune_run(folder, cfg, run_dir=tmp_path / "run", progress=False)


def test_finetuning_a_model_with_atlases_keeps_them(tmp_path, caplog):
    """The default model's atlases come along when the labels stay; a new label set drops them."""
    from CascadeSegLib.packaging.model import ModelPackage, find_model
    from CascadeSegLib.resources import DEFAULT_MODEL
    from CascadeSegLib.train.finetune import finetune_run

    src = ModelPackage.load(find_model(DEFAULT_MODEL))
    assert src.atlas_prior is not None
    cfg = _finetune_config(tmp_path, list(src.labels.names), iterations=0)
    data = json.loads(cfg.read_text())
    data["stages"] = [{"name": s.name, "patch": [16, 16, 16]} for s in src.stages]
    cfg.write_text(json.dumps(data))
    run = finetune_run(DEFAULT_MODEL, cfg, run_dir=tmp_path / "run", progress=False, device="cpu")
    pkg = ModelPackage.load(run / "model")
    pkg.verify()                                   # weights and every atlas file match model.json
    assert [a.name for a in pkg.atlas_prior.atlases] == [a.name for a in src.atlas_prior.atlases]
    assert pkg.atlas_prior.network_weight == src.atlas_prior.network_weight
    for name, _ in pkg.atlas_prior.files():
        assert (run / "model" / name).read_bytes() == (src.root / name).read_bytes()

    data["labels"] = ["liver", "spleen"]
    cfg.write_text(json.dumps(data))
    run = finetune_run(DEFAULT_MODEL, cfg, run_dir=tmp_path / "run2", progress=False, device="cpu")
    assert ModelPackage.load(run / "model").atlas_prior is None
    assert "without them" in caplog.text


def test_help_texts_state_the_libraries_learning_rate_factor():
    """The parsers spell the default out (importing it would load torch before --help); they must
    say what finetune_run does."""
    import subprocess
    import sys

    from cli_process import REPO, cascadeseg, child_env

    from CascadeSegLib.train.finetune import DEFAULT_LR_FACTOR

    finetune = cascadeseg("finetune", "--help")
    prepared = subprocess.run([sys.executable, str(REPO / "configs" / "train_prepared.py"), "train", "--help"],
                              capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=300)
    for res in (finetune, prepared):
        assert res.returncode == 0, res.stderr
        assert f"(default {DEFAULT_LR_FACTOR:g})" in " ".join(res.stdout.split()), res.args
