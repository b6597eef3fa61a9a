"""Training must learn: a small network reaches Dice > 0.85 on a phantom it never saw.

(An untrained network scores about 0. The run is seeded, but CPUs with other vector units give
other float roundings and so another trajectory: 0.897 on one machine of this project, > 0.9 on
another; the threshold leaves room for that, not for a broken loss or sampler.)

If the loss, the sampler, the label handling or the optimiser is broken this fails. The
exported package is then run through the real inference path (Segmenter) on the held-out
phantom, so export and inference agree with what training validated.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from train_helpers import small_config, write_phantom_cases

from CascadeSegLib.train import trainer as trainer_module


@pytest.mark.parametrize("cpu_bf16", [False, True], ids=["float32", "cpu-bfloat16"])
def test_small_network_learns_phantom_organs(tmp_path, monkeypatch, cpu_bf16):
    from CascadeSegLib.inference.cascade import Segmenter
    from CascadeSegLib.packaging.model import ModelPackage
    from CascadeSegLib.train.config import parse_config
    from CascadeSegLib.train.trainer import train_run

    if cpu_bf16 and not trainer_module.cpu_computes_bf16():
        pytest.skip("this CPU has no bfloat16 arithmetic (AMX or AVX512-BF16): train.cpu_bf16 is ignored here")
    # what the network computes in while it trains (a forward hook on every network the trainer builds)
    dtypes: set[torch.dtype] = set()
    real_build = trainer_module.build_network

    def build_and_watch(*args, **kwargs):
        net = real_build(*args, **kwargs)
        net.register_forward_hook(lambda module, inputs, out: dtypes.add(out.dtype) if module.training else None)
        return net

    monkeypatch.setattr(trainer_module, "build_network", build_and_watch)

    organs = ("liver", "spleen", "stomach")
    cases = write_phantom_cases(tmp_path / "data", seeds=[1, 2, 7], size=(45, 32, 24), spacing=(8.0, 8.0, 8.0),
                                organs=organs)
    data = small_config(cases, train=["ph1", "ph2"], val=["ph7"], iterations=400, patch=(24, 24, 24), base=8,
                        organs=organs, spacing=(8.0, 8.0, 8.0), norm="instance", lr=1e-2, schedule="poly",
                        loss="wce+dice", val_every=100, checkpoint_every=100, foreground_fraction=0.5,
                        cpu_bf16=cpu_bf16)
    data["stages"][0]["tile"] = [48, 32, 24]
    data["augment"] = {"enabled": False}      # augmentation has its own tests; here it would only slow learning
    cfg = parse_config(data, tmp_path)
    start = time.perf_counter()
    run = train_run(cfg, tmp_path / "run", progress=False)
    seconds = time.perf_counter() - start
    done = json.loads((run / "stage1" / "done.json").read_text(encoding="utf-8"))
    assert done["iterations"] == 400
    val = done["best_val_dice"]
    assert val["mean"] > 0.85 and min(val[o] for o in organs) > 0.8, f"validation Dice after {seconds:.0f}s: {val}"
    print(f"trained in {seconds:.0f}s, validation Dice {val}")
    assert dtypes == ({torch.bfloat16} if cpu_bf16 else {torch.float32}), dtypes

    # The exported package segments the held-out phantom on its own grid with the same quality.
    pkg = ModelPackage.load(run / "model")
    pkg.verify()
    assert pkg.labels.names == list(organs)
    image = sitk.ReadImage(cases[2]["image"])
    truth = sitk.GetArrayFromImage(sitk.ReadImage(cases[2]["label"]))
    result = Segmenter(pkg, device="cpu").segment(image)
    pred = sitk.GetArrayFromImage(result.labels)
    assert result.labels.GetOrigin() == image.GetOrigin() and result.labels.GetSpacing() == image.GetSpacing()
    dice = [2 * np.sum((pred == v) & (truth == v)) / (np.sum(pred == v) + np.sum(truth == v)) for v in range(1, 4)]
    assert np.mean(dice) > 0.85, dice
