"""Small model packages for tests: random weights (geometry tests) built in a second."""

from __future__ import annotations

from pathlib import Path

import torch

from CascadeSegLib.labels import LabelSet
from CascadeSegLib.network import NetConfig, build_network
from CascadeSegLib.packaging.model import ModelPackage, StageSpec


def make_random_model(folder: Path, organs=("liver", "spleen", "kidney_right"), seed: int = 0,
                      spacing1=(8.0, 8.0, 8.0), spacing2=(5.0, 5.0, 5.0), kind: str = "padded") -> ModelPackage:
    labels = LabelSet.from_names(organs)
    k = labels.num_classes
    if kind == "valid":
        net1 = NetConfig(kind="valid", num_classes=k, base_channels=2, depth=2)
        tile1 = (28, 28, 28)
    else:
        net1 = NetConfig(kind="padded", num_classes=k, base_channels=4, depth=3)
        tile1 = (32, 32, 32)
    stages = [StageSpec("stage1", spacing1, tile1, net1, "stage1.pt"),
              StageSpec("stage2", spacing2, (32, 32, 32),
                        NetConfig(kind="padded", num_classes=k, base_channels=4, depth=3), "stage2.pt")]
    torch.manual_seed(seed)
    nets = [build_network(s.network) for s in stages]
    # Bias towards foreground so C2 and the labels are not empty with random weights.
    with torch.no_grad():
        for net in nets:
            net.head.bias[1:] += 2.0
    pkg = ModelPackage(name="random-test", version="0.0", labels=labels, stages=stages,
                       description="random weights for geometry tests")
    pkg.save(folder, [n.state_dict() for n in nets])
    return ModelPackage.load(folder)
