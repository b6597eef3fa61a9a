"""What most peers do: MONAI's sliding_window_inference over the whole volume (0.5 overlap).

Same CT, same I/O (SimpleITK read, resample to the model's stage-2 spacing, window, network,
argmax, nearest-neighbour back to the input grid, NIfTI write) and the same stage-2 network
weights as CascadeSeg's cascade; only the "where to compute" differs. Prints one JSON line.

    python benchmarks/monai_peer.py CT OUT.nii.gz [--model NAME] [--overlap 0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import common  # noqa: F401 - puts the repository on sys.path
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from CascadeSegLib.inference.preprocess import normalize, resample_to_spacing
from CascadeSegLib.network import fold_batchnorm
from CascadeSegLib.packaging.model import load_model


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ct")
    ap.add_argument("out")
    ap.add_argument("--model", default=None)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--sw-batch", type=int, default=1)
    args = ap.parse_args()
    t = {}
    t0 = time.perf_counter()
    model = load_model(args.model)
    stage = model.stages[-1]
    net = fold_batchnorm(model.load_network(len(model.stages) - 1, "cpu"))
    image = sitk.ReadImage(args.ct)
    t["read"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    grid = resample_to_spacing(image, stage.spacing, "linear", -1024.0, sitk.sitkFloat32)
    x = normalize(torch.from_numpy(sitk.GetArrayFromImage(grid)), model.window, model.normalization)[None, None]
    t["preprocess"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(x, roi_size=stage.tile_zyx, sw_batch_size=args.sw_batch, predictor=net,
                                          overlap=args.overlap, mode="constant")
        labels = logits.argmax(1)[0].to(torch.uint8)
    t["network"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    lab = sitk.GetImageFromArray(labels.numpy())
    lab.CopyInformation(grid)
    back = sitk.Resample(lab, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    t["postprocess"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    sitk.WriteImage(back, args.out, True)
    t["write"] = time.perf_counter() - t1
    t["total"] = time.perf_counter() - t0
    print(json.dumps({"event": "done", "timings": t, "grid": list(grid.GetSize()),
                      "voxels_computed": int(x.numel())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
