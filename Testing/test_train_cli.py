"""`cascadeseg train | finetune | export` through the real CLI entry point."""

from __future__ import annotations

import json
import shutil
import zipfile

from train_helpers import small_config, write_phantom_cases


def test_train_export_finetune_commands(tmp_path, capsys):
    from CascadeSegLib.cli import main
    from CascadeSegLib.packaging.model import ModelPackage

    # ph2 is listed in the config but in neither split list: it must not be called training data.
    cases = write_phantom_cases(tmp_path / "data", seeds=[1, 2], size=(32, 32, 24), spacing=(8.0, 8.0, 8.0))
    data = small_config(cases, train=["ph1"], val=[], iterations=2, patch=(16, 16, 16))
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps(data))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0
    assert (run / "config.json").is_file() and (run / "stage1" / "log.csv").is_file()
    pkg = ModelPackage.load(run / "model")
    pkg.verify()
    assert pkg.stages[0].tile == (48, 40, 32) and pkg.window == (-200.0, 300.0)
    assert pkg.provenance["trained_on"] == ["ph1"]

    # Running again resumes a finished run (nothing to do); a changed config is refused.
    assert main(["train", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0
    data["train"]["lr"] = 0.5
    cfg.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["train", str(cfg), "--run-dir", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cascadeseg: error:") and "different config" in err and "\n" not in err

    out = tmp_path / "exported.zip"
    assert main(["export", str(run), "-o", str(out)]) == 0
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == ["model.json", "stage1.pt"]
    assert ModelPackage.load(out).verify().keys() == {"stage1.pt"}

    # A damaged config.json (a full disk, an edit) is one line on resume, export and train-status.
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "config.json").write_text((run / "config.json").read_text()[:40])
    capsys.readouterr()
    for argv in (["train", str(cfg), "--run-dir", str(damaged), "--no-progress"],
                 ["export", str(damaged), "-o", str(tmp_path / "m2")], ["train-status", str(damaged)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"cascadeseg: error: {damaged / 'config.json'} is damaged (") and "\n" not in err
        assert err.endswith("restore it from a copy, or start the run again in a new --run-dir")
    assert not (tmp_path / "m2").exists()

    ft = {k: v for k, v in data.items() if k not in ("stages", "intensity")}
    ft["labels"] = ["liver", "spleen"]
    ft["train"] = {**data["train"], "iterations": 1}
    ft_cfg = tmp_path / "ft.json"
    ft_cfg.write_text(json.dumps(ft))
    assert main(["finetune", str(run / "model"), str(ft_cfg), "--run-dir", str(tmp_path / "ft"),
                 "--freeze-encoder", "--no-progress"]) == 0
    assert ModelPackage.load(tmp_path / "ft" / "model").labels.names == ["liver", "spleen"]


def test_bad_config_is_one_line_user_error(tmp_path, capsys):
    from CascadeSegLib.cli import main

    assert main(["train", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{\"name\": \"x\", ")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid JSON" in err and "\n" not in err
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "m")]) == 2
    assert "not a training run folder" in capsys.readouterr().err


def test_train_status_names_a_2d_baseline_run(tmp_path, capsys):
    """A three-view baseline's run folder holds a config.json too, in the form its trainer writes."""
    from pathlib import Path

    from CascadeSegLib.cli import main

    configs = Path(__file__).resolve().parents[1] / "configs"
    raw = json.loads((configs / "baseline2d-phantom.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({"config": raw, "base_dir": str(configs)}))
    assert main(["train-status", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"cascadeseg: error: {tmp_path} is a 2D three-view baseline run "
                                               "(cascadeseg baseline2d), not a cascade run")
