"""What TotalSegmentator, SlicerNNUNet and MONAI Auto3DSeg's nnU-Net run: nnU-Net v2's predictor.

`nnUNetPredictor` with manual initialisation around the model's own stage-2 network and weights
(CascadeSegLib's UNet3D; nnU-Net only needs an nn.Module), a minimal plans / configuration /
dataset.json built in a temp folder, and TotalSegmentator's fast settings: tile step 0.5,
Gaussian weighting, no mirroring. End to end with nnU-Net's own code, in this process:

- read: nnU-Net's SimpleITKIO;
- preprocess: DefaultPreprocessor (crop to non-zero, CTNormalization, resample to the stage's
  spacing with nnU-Net's default order-3 resampling);
- network: `predict_logits_from_preprocessed_data` (sliding window over the whole volume);
- export: `export_prediction_from_logits` (logits back to the input grid with order-1
  resampling, argmax, NIfTI written by SimpleITKIO).

CTNormalization is given the model's window as its clip bounds, mean and std
(clip to [lo, hi], minus lo, divided by hi - lo), so the network sees the inputs it was
trained on. Prints one JSON line. Needs nnunetv2 (benchmark-only dependency; see bench_peers.py).

    python benchmarks/nnunet_peer.py CT OUT.nii.gz [--model NAME_OR_PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 - puts the repository on sys.path

# nnU-Net reads these at import time and warns when they are unset; nothing is read from them here.
for _var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ.setdefault(_var, tempfile.gettempdir())

import torch  # noqa: E402


def plans_and_dataset(model, stage) -> tuple[dict, dict]:
    """Minimal nnU-Net plans (one 3d_fullres configuration) and dataset.json for `stage`."""
    lo, hi = (float(v) for v in model.window)
    if model.normalization != "window01":
        raise SystemExit(f"nnunet_peer: model normalization {model.normalization!r} has no CTNormalization twin")
    resampling = "resample_data_or_seg_to_shape"
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 1,
        "patch_size": list(stage.tile_zyx),                 # arrays are z, y, x (SimpleITKIO)
        "median_image_size_in_voxels": list(stage.tile_zyx),
        "spacing": [float(s) for s in stage.spacing[::-1]],  # stage.spacing is x, y, z
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": resampling,
        "resampling_fn_seg": resampling,
        "resampling_fn_probabilities": resampling,
        # nnU-Net's defaults (ExperimentPlanner), as TotalSegmentator's plans
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": "CascadeSegLib.network.UNet3D", "arch_kwargs": {},
                         "_kw_requires_import": []},
        "batch_dice": False,
    }
    plans = {
        "dataset_name": "Dataset999_CascadeSegBench",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": configuration["spacing"],
        "original_median_shape_after_transp": list(stage.tile_zyx),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": lo, "std": hi - lo, "percentile_00_5": lo, "percentile_99_5": hi,
                  "min": lo, "max": hi, "median": (lo + hi) / 2}},
    }
    values = [lab.value for lab in model.labels]
    if values != list(range(1, len(values) + 1)):
        raise SystemExit("nnunet_peer: nnU-Net needs label values 1..K (channel index = label value)")
    labels = {"background": 0, **{lab.name: lab.value for lab in model.labels}}
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    return plans, dataset


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ct")
    ap.add_argument("out", help="output label map (.nii.gz)")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from CascadeSegLib.network import fold_batchnorm
    from CascadeSegLib.packaging.model import load_model

    if not args.out.endswith(".nii.gz"):
        raise SystemExit("nnunet_peer: OUT must end in .nii.gz")
    model = load_model(args.model)
    index = len(model.stages) - 1
    stage = model.stages[index]
    net = fold_batchnorm(model.load_network(index, "cpu"))
    plans, dataset = plans_and_dataset(model, stage)
    with tempfile.TemporaryDirectory(prefix="nnunet-peer-") as tmp:
        # what a trained nnU-Net folder holds: plans.json and dataset.json (read back by nnU-Net)
        for name, obj in (("plans.json", plans), ("dataset.json", dataset)):
            Path(tmp, name).write_text(json.dumps(obj, indent=1))
        plans_manager = PlansManager(str(Path(tmp, "plans.json")))
        configuration = plans_manager.get_configuration("3d_fullres")
        dataset = json.loads(Path(tmp, "dataset.json").read_text())
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.manual_initialization(net, plans_manager, configuration, [net.state_dict()], dataset,
                                    "CascadeSegStage2", None)

    t = {}
    t0 = time.perf_counter()
    data, props = SimpleITKIO().read_images([args.ct])
    t["read"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    pre, _, props = DefaultPreprocessor(verbose=False).run_case_npy(data, None, props, plans_manager, configuration,
                                                                     dataset)
    del data
    x = torch.from_numpy(pre).contiguous()
    t["preprocess"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    logits = predictor.predict_logits_from_preprocessed_data(x).cpu()
    t["network"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    export_prediction_from_logits(logits, props, configuration, plans_manager, dataset,
                                  args.out[: -len(".nii.gz")], False)
    t["export"] = time.perf_counter() - t1
    t["total"] = time.perf_counter() - t0
    slicers = predictor._internal_get_sliding_window_slicers(tuple(x.shape[1:]))
    print(json.dumps({"event": "done", "timings": t, "grid": list(x.shape[1:])[::-1], "windows": len(slicers),
                      "spacing": list(stage.spacing), "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
