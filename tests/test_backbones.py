"""Tests of the backbone registry: shapes per input kind, dilation and small-input stems, local weights, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mola.models import BACKBONES, BackboneConfig, build_backbone


def out_of(net: nn.Module, shape: tuple[int, ...], n: int = 2) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(torch.randn(n, *shape))


def test_registry_names() -> None:
    assert {"small_cnn", "resnet18", "resnet50", "mlp", "vit_small"} <= set(BACKBONES.names())


@pytest.mark.parametrize("name,shape,dense,expected", [
    ("small_cnn", (1, 28, 28), False, (64, 4, 4)),
    ("small_cnn", (3, 28, 28), True, (64, 14, 14)),  # dense: stride 2 only
    ("resnet18", (1, 32, 32), False, (512, 4, 4)),  # small-input stem: stride 8
    ("resnet18", (3, 64, 64), True, (512, 32, 32)),  # small-input stem + dilated layer3/4: stride 2
    ("resnet50", (3, 32, 32), False, (2048, 4, 4)),
    ("mlp", (1, 8, 8), False, (64,)),
    ("mlp", (20,), False, (64,)),
    ("vit_small", (3, 16, 16), False, (32,)),
    ("vit_small", (3, 16, 16), True, (32, 4, 4)),
])
def test_output_shapes_and_out_dim(name: str, shape: tuple[int, ...], dense: bool,
                                   expected: tuple[int, ...]) -> None:
    net = build_backbone(BackboneConfig(name=name, width=8), shape, dense)
    y = out_of(net, shape)
    assert tuple(y.shape) == (2, *expected)
    assert net.out_dim == expected[0]


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("resnet50", 2048)])
def test_dilated_resnet_keeps_stride_8(name: str, channels: int) -> None:
    cfg = BackboneConfig(name=name, dilated=True, small_input=False)
    net = build_backbone(cfg, (3, 64, 64), dense=True)
    sizes: dict[str, tuple[int, ...]] = {}
    for layer in ("layer2", "layer3", "layer4"):
        getattr(net, layer).register_forward_hook(
            lambda m, i, o, layer=layer: sizes.__setitem__(layer, tuple(o.shape[-2:])))
    y = out_of(net, (3, 64, 64), n=1)
    assert sizes == {"layer2": (8, 8), "layer3": (8, 8), "layer4": (8, 8)}
    assert tuple(y.shape) == (1, channels, 8, 8)
    plain = build_backbone(BackboneConfig(name=name, dilated=False, small_input=False), (3, 64, 64), dense=True)
    assert tuple(out_of(plain, (3, 64, 64), n=1).shape) == (1, channels, 2, 2)


def test_small_input_stem() -> None:
    small = build_backbone(BackboneConfig(name="resnet18"), (1, 32, 32), dense=False)  # auto: <= 64 px
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity) and small.conv1.in_channels == 1
    big = build_backbone(BackboneConfig(name="resnet18", small_input=False), (1, 32, 32), dense=False)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.in_channels == 1
    assert tuple(out_of(big, (1, 32, 32)).shape) == (2, 512, 1, 1)


@pytest.mark.parametrize("name,shape", [("small_cnn", (1, 28, 28)), ("mlp", (1, 8, 8)), ("vit_small", (3, 16, 16))])
def test_load_local_weights(name: str, shape: tuple[int, ...], tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_backbone(BackboneConfig(name=name, width=8), shape, False)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    loaded = build_backbone(BackboneConfig(name=name, width=8, weights=str(path)), shape, False)
    for key, value in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_torchvision_resnet_weights_skips_classifier(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(ref.state_dict(), path)
    net = build_backbone(BackboneConfig(name="resnet18", weights=str(path), small_input=False), (3, 64, 64), False)
    assert torch.equal(net.conv1.weight, ref.conv1.weight)
    assert torch.equal(net.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_backbone(BackboneConfig(name="small_cnn", weights=str(path)), (1, 28, 28), False)


def test_unrelated_weights_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"something.else": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="share no tensor"):
        build_backbone(BackboneConfig(name="small_cnn", weights=str(path)), (1, 28, 28), False)


def test_unknown_backbone_lists_close_names() -> None:
    with pytest.raises(ValueError, match="resnet18") as err:
        build_backbone(BackboneConfig(name="resnet19"), (3, 32, 32), False)
    assert "Did you mean" in str(err.value) and "small_cnn" in str(err.value)


@pytest.mark.parametrize("name,shape,dense", [
    ("mlp", (1, 8, 8), True), ("small_cnn", (20,), False), ("resnet18", (20,), False),
    ("vit_small", (3, 18, 18), False),
])
def test_bad_input_kinds_are_errors(name: str, shape: tuple[int, ...], dense: bool) -> None:
    with pytest.raises(ValueError):
        build_backbone(BackboneConfig(name=name, width=8), shape, dense)


def test_timm_backbone() -> None:
    timm = pytest.importorskip("timm")
    assert timm is not None
    net = build_backbone(BackboneConfig(name="timm:resnet18"), (3, 32, 32), dense=True)
    y = out_of(net, (3, 32, 32))
    assert y.dim() == 4 and y.shape[1] == net.out_dim


def test_timm_name_without_timm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without timm (hidden here: ``import timm`` fails), a timm: backbone is a ValueError naming timm."""
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ValueError, match="timm"):
        build_backbone(BackboneConfig(name="timm:resnet18"), (3, 32, 32), False)


@pytest.mark.parametrize(("attrs", "pattern"), [
    ({}, r"backbone 'toy' built a Toy without a positive int `out_dim` \(got None\): set self\.out_dim"),
    ({"out_dim": 0}, r"without a positive int `out_dim` \(got 0\)"),
    ({"out_dim": 4, "mola_stages": ["body", "nope"]}, r"`mola_stages` names no submodule: \['nope'\]"),
    ({"out_dim": 4, "fixed_input_size": "yes"}, r"`fixed_input_size` is 'yes', not a bool"),
])
def test_registered_backbone_is_checked_against_the_protocol(attrs: dict, pattern: str) -> None:
    """A builder registered in a BackboneRegistry has what it builds checked: a missing or bad attribute of the
    Backbone protocol is a TypeError naming the backbone and the attribute; a conforming one passes."""
    from mola.models.backbones import Backbone, BackboneRegistry

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(3, 4)
            for k, v in attrs.items():
                setattr(self, k, v)

    reg = BackboneRegistry("backbone")
    reg.register("toy")(lambda shape, cfg, dense: Toy())
    with pytest.raises(TypeError, match=pattern):
        reg.get("toy")((3,), BackboneConfig(name="toy"), False)
    attrs.clear()
    attrs.update(out_dim=4, mola_stages=["body"])
    net = reg.get("toy")((3,), BackboneConfig(name="toy"), False)
    assert isinstance(net, Backbone) and net.out_dim == 4
