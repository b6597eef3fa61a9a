"""The paper's network has the paper's shapes and size; the fast one keeps its input size."""

import pytest
import torch

from CascadeSegLib.network import (
    NetConfig,
    build_network,
    count_parameters,
    fold_batchnorm,
    margin,
    output_shape,
    valid_input_size,
)


def test_paper_network_tile_shapes_and_parameter_count():
    cfg = NetConfig.paper(num_classes=3)
    net = build_network(cfg).eval()
    # 132x132x116 (x, y, z) -> 44x44x28, i.e. (z, y, x) 116x132x132 -> 28x44x44.
    assert output_shape(cfg, (116, 132, 132)) == (28, 44, 44)
    assert margin(cfg) == 44
    # Cicek et al. report 19,069,955 parameters for their 3-class 3D U-Net.
    n = count_parameters(net)
    assert 19.0e6 < n < 19.2e6, n
    with torch.inference_mode():
        y = net(torch.zeros(1, 1, 116, 132, 132))
    assert tuple(y.shape) == (1, 3, 28, 44, 44)


def test_paper_network_channel_pattern():
    net = build_network(NetConfig.paper(num_classes=8))
    convs = [m.out_channels for m in net.encoders.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs == [32, 64, 64, 128, 128, 256, 256, 512]


@pytest.mark.parametrize("depth,base,norm", [(3, 8, "batch"), (4, 4, "instance"), (2, 6, "none")])
def test_padded_network_keeps_size(depth, base, norm):
    cfg = NetConfig(kind="padded", num_classes=5, base_channels=base, depth=depth, norm=norm)
    net = build_network(cfg).eval()
    f = 2 ** (depth - 1)
    shape = (2 * f, 3 * f, 4 * f)
    with torch.inference_mode():
        y = net(torch.randn(2, 1, *shape))
    assert tuple(y.shape) == (2, 5) + shape
    with pytest.raises(ValueError):
        output_shape(cfg, (f + 1, f, f))


def test_valid_input_size_is_smallest_that_fits():
    cfg = NetConfig(kind="valid", num_classes=2, base_channels=4, depth=3)
    n = valid_input_size(cfg, 20)
    assert output_shape(cfg, (n, n, n))[0] >= 20
    smaller = [m for m in range(1, n) if _fits(cfg, m, 20)]
    assert smaller == []


def _fits(cfg, n, want):
    try:
        return output_shape(cfg, (n, n, n))[0] >= want
    except ValueError:
        return False


def test_folded_batchnorm_gives_same_output():
    torch.manual_seed(0)
    cfg = NetConfig(kind="padded", num_classes=4, base_channels=4, depth=3)
    net = build_network(cfg)
    # Give BatchNorm non-trivial statistics, then compare eval outputs before/after folding.
    net.train()
    for _ in range(3):
        net(torch.randn(2, 1, 16, 16, 16) * 3 + 1)
    net.eval()
    x = torch.randn(1, 1, 16, 24, 16)
    with torch.inference_mode():
        before = net(x)
        after = fold_batchnorm(net)(x)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_config_json_round_trip_and_errors():
    cfg = NetConfig(kind="padded", num_classes=11, base_channels=16, depth=4, norm="instance")
    assert NetConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError):
        NetConfig.from_json({**cfg.to_json(), "bogus": 1})
    with pytest.raises(ValueError):
        NetConfig(kind="dense")
