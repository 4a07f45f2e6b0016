"""``target_modules`` as one string (a preset, a module name or a ``re:`` pattern) in code, YAML and on the
command line; stage presets on torchvision MobileNetV3 and ConvNeXt; candidate layers in the error; ``mola
layers``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import mola
from mola.cli.main import main
from mola.data.base import TaskInfo
from mola.data.synthetic import ScenarioSpec, synthetic_scenario
from mola.engine import load_config
from mola.inject import find_stage_groups, resolve_targets
from mola.models import build_model

SPEC = ScenarioSpec("toy", "multi_input", [TaskInfo("a", "classification", 2), TaskInfo("b", "classification", 3)],
                    (3, 16, 16))


def wrapped(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in ("MoLAConv2d", "MoLALinear")]


def tiny_mobilenet() -> nn.Module:
    return torchvision.models.mobilenet_v3_small(width_mult=0.25, num_classes=3)


def tiny_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=3)


@pytest.mark.parametrize("target", ["fc", "layer4.0.conv1", r"re:layer4\.\d\.conv2"])
def test_string_target_is_a_name_or_pattern(target: str) -> None:
    net = torchvision.models.resnet18(num_classes=3)
    names = resolve_targets(net, target)
    expected = {"fc": ["fc"], "layer4.0.conv1": ["layer4.0.conv1"],
                r"re:layer4\.\d\.conv2": ["layer4.0.conv2", "layer4.1.conv2"]}[target]
    assert names == expected
    model = mola.inject(net, mola.MoLAConfig(num_experts=2, rank=2, target_modules=target))
    assert [n.removeprefix("model.") for n in wrapped(model)] == expected


def test_string_target_in_yaml_and_on_the_command_line(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  backbone: {name: resnet18}\n  mola: {target_modules: layer4.1.conv1}\n")
    for cfg in (load_config(cfg_file), load_config(None, ["model.backbone.name=resnet18",
                                                           "model.mola.target_modules=layer4.1.conv1"])):
        assert cfg.model.mola.target_modules == "layer4.1.conv1"
        model = build_model(synthetic_scenario(SPEC), cfg.model)
        assert [n.split("encoder.")[-1].removeprefix("model.") for n in wrapped(model)] == ["layer4.1.conv1"]
    regex = load_config(None, ["model.backbone.name=resnet18", r"model.mola.target_modules=re:layer3\.0\.conv\d"])
    model = build_model(synthetic_scenario(SPEC), regex.model)
    assert [n.split(".")[-1] for n in wrapped(model)] == ["conv1", "conv2"]


@pytest.mark.parametrize("make", [tiny_mobilenet, tiny_convnext], ids=["mobilenet_v3", "convnext"])
def test_last_stage_on_torchvision_feature_stacks(make) -> None:
    net = make()
    groups, kind = find_stage_groups(net)
    assert len(groups) >= 3 and kind == "any"
    last = groups[-1]
    sizes = {}
    hooks = [net.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: sizes.__setitem__(p, o.shape[-2:]))
             for g in groups for p in g]
    net.eval()
    with torch.no_grad():
        net(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert len({tuple(sizes[p]) for p in last}) == 1  # one resolution in the last stage ...
    assert all(tuple(sizes[p]) != tuple(sizes[last[0]]) for g in groups[:-1] for p in g)  # ... and only there
    model = mola.inject(net, mola.MoLAConfig(num_experts=2, target_modules="last_stage"))
    names = [n.removeprefix("model.") for n in wrapped(model)]
    assert names and all(any(n.startswith(p + ".") for p in last) for n in names)
    out = model(torch.randn(2, 3, 32, 32), task_ids=torch.tensor([0, 1]))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_no_match_lists_candidate_layers() -> None:
    with pytest.raises(ValueError, match=r"'layer9' matched no module.*Candidate layers: conv1 \(Conv2d\), "
                                         r"layer1\.0\.conv1 \(Conv2d\)"):
        resolve_targets(torchvision.models.resnet18(), "layer9")

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    with pytest.raises(ValueError, match=r"Odd is none of these.*Candidate layers: a \(Linear\), b \(Linear\)"):
        resolve_targets(Odd(), "last_stage")


def test_mola_layers_lists_stages_and_adapter_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(__file__).resolve().parents[1] / "configs/paper/radimagenet_grad.yaml"
    assert main(["layers", "--config", str(config), "--synthetic",
                 "model.backbone.name=resnet18", "data.image_size=32", "model.mola.rank=2"]) == 0
    text = capsys.readouterr().out
    assert "stage 4 (layer4):" in text and "outside the stages:" in text
    line = next(ln for ln in text.splitlines() if "layer4.0.conv1 " in ln)
    # kernel layout, E adapters of B (co*k, r*k) and A (r*k, ci*k): 3 tasks by default in the stand-in
    e, r, k, ci, co = 3, 2, 3, 256, 512
    assert line.lstrip().startswith("*") and f"+{e * (r * k * ci * k + co * k * r * k):,} adapter params" in line
    assert "layer1.0.conv1" in text and not next(ln for ln in text.splitlines() if "layer1.0.conv1 " in ln) \
        .lstrip().startswith("*")


def test_target_on_the_mola_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fixtures_data import make_task_folders

    root = make_task_folders(tmp_path / "mine")
    args = ["train", "--config", "demo", "--dry-run", "data.kind=tasks", f"data.root={root}"]
    assert main([*args, "model.mola.target_modules=layer4.conv1"]) == 0
    one = capsys.readouterr().out
    assert main([*args, r"model.mola.target_modules=re:layer4\.conv\d"]) == 0
    two = capsys.readouterr().out
    adapters = [int(re.search(r"'adapters': (\d+)", t).group(1)) for t in (one, two)]  # type: ignore[union-attr]
    # kernel layout, 3 tasks, rank 4, small_cnn width 16: layer4.conv1 is 64 -> 128, layer4.conv2 128 -> 128, 3x3
    conv1, conv2 = 3 * (4 * 3 * 64 * 3 + 128 * 3 * 4 * 3), 3 * (4 * 3 * 128 * 3 + 128 * 3 * 4 * 3)
    assert adapters == [conv1, conv1 + conv2]
