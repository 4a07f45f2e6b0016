"""The paper's settings: weights by name through a (temporary, offline) torch hub cache, input-layer adaptation,
ShuffleNetV2 / ViT-B/16 backbones, the PSPNet head, the MedMNIST-9 and paper-augment presets, StepLR,
``train.select_on: test_loss``, every configs/paper file built on a synthetic stand-in, and the CPU smoke check."""

from __future__ import annotations

import csv
import glob
import json
import sys
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision import transforms as T

from fixtures_data import make_npz
from mola import MoLAConfig
from mola.data import build_scenario
from mola.data.config import DataConfig
from mola.data.synthetic import ScenarioSpec, scenario_spec, synthetic_scenario
from mola.data.transforms import ImageFileTransform
from mola.engine import Trainer, load_config
from mola.engine.dryrun import dry_run
from mola.engine.trainer import build_optimizer
from mola.inject import inject
from mola.layers import MoLAConv2d
from mola.models import BackboneConfig, build_backbone, build_model
from mola.models.base import ModelConfig
from mola.models.heads import PSPHead
from mola.models.weights import adapt_input_conv, torchvision_weights, weight_cache_file
from test_layers import hand_reference

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted(glob.glob(str(ROOT / "configs/paper/*.yaml")))
PAPER_SWEEPS = sorted(glob.glob(str(ROOT / "configs/paper/sweeps/*.yaml")))


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TORCH_HOME in a temporary folder and no network: any download attempt fails like an offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls: list[str] = []

    def no_network(url: str, *args: Any, **kwargs: Any) -> None:
        calls.append(url)
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def cache_state(folder: Path, filename: str, state: dict[str, torch.Tensor]) -> None:
    torch.save(state, folder / filename)


# -- weights by name ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,name,filename", [
    ("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    ("resnet18", "DEFAULT", "resnet18-f37072fd.pth"),
    ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    ("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth"),
    ("resnet50", "DEFAULT", "resnet50-11ad3fa6.pth"),  # DEFAULT is V2 for resnet50
    ("shufflenet_v2_x1_0", "IMAGENET1K_V1", "shufflenetv2_x1-5666bf0f80.pth"),
    ("vit_b_16", "IMAGENET1K_V1", "vit_b_16-c867db91.pth"),
])
def test_weight_names_resolve_to_the_cache_file(offline_hub: Path, model: str, name: str, filename: str) -> None:
    assert weight_cache_file(torchvision_weights(model, name)) == offline_hub / filename


def test_unknown_weight_name_lists_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V1.*DEFAULT|DEFAULT.*IMAGENET1K_V1") as err:
        build_backbone(BackboneConfig(name="resnet18", weights="IMAGENET1K_V9"), (3, 64, 64), False)
    assert "IMAGENET1K_V9" in str(err.value)
    with pytest.raises(ValueError, match="small_cnn.*no pretrained weights"):
        build_backbone(BackboneConfig(name="small_cnn", weights="IMAGENET1K_V1"), (3, 28, 28), False)


def test_named_weights_load_from_the_hub_cache_offline(offline_hub: Path) -> None:
    torch.manual_seed(3)
    ref = torchvision.models.resnet18(weights=None)
    cache_state(offline_hub, "resnet18-f37072fd.pth", ref.state_dict())
    torch.manual_seed(4)
    net = build_backbone(BackboneConfig(name="resnet18", weights="DEFAULT", small_input=False), (3, 64, 64), False)
    for key, value in net.state_dict().items():
        assert torch.equal(value, ref.state_dict()[key]), key
    ref.eval()
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # same features as torchvision's model before its pool/fc
        feats = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        torch.testing.assert_close(net(x), feats)


def test_offline_without_cached_file_is_one_line_saying_where(offline_hub: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        build_backbone(BackboneConfig(name="shufflenet_v2_x1_0", weights="IMAGENET1K_V1"), (3, 64, 64), False)
    msg = str(err.value)
    assert "\n" not in msg
    assert "shufflenetv2_x1-5666bf0f80.pth" in msg and str(offline_hub) in msg
    assert "no network (test)" in msg and "copy it to" in msg and "TORCH_HOME" in msg


def test_corrupt_cached_file_is_named(offline_hub: Path) -> None:
    (offline_hub / "resnet18-f37072fd.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read cached weights .*resnet18-f37072fd.pth"):
        build_backbone(BackboneConfig(name="resnet18", weights="IMAGENET1K_V1"), (3, 64, 64), False)


def test_one_channel_input_sums_the_rgb_filters(offline_hub: Path) -> None:
    torch.manual_seed(5)
    ref = torchvision.models.resnet18(weights=None)
    cache_state(offline_hub, "resnet18-f37072fd.pth", ref.state_dict())
    gray = build_backbone(BackboneConfig(name="resnet18", weights="IMAGENET1K_V1", small_input=False),
                          (1, 64, 64), False)
    assert gray.conv1.weight.shape == (64, 1, 7, 7)
    torch.testing.assert_close(gray.conv1.weight, ref.conv1.weight.sum(dim=1, keepdim=True))
    rgb = build_backbone(BackboneConfig(name="resnet18", weights="IMAGENET1K_V1", small_input=False),
                         (3, 64, 64), False)
    gray.eval()
    rgb.eval()
    x = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():  # a gray image through the summed filters = the image replicated to RGB
        # (up to the float32 rounding of the summed filters)
        torch.testing.assert_close(gray.double()(x), rgb.double()(x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)


def test_adapt_input_conv_other_channel_counts() -> None:
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    w5 = adapt_input_conv(w, 5)
    assert w5.shape == (4, 5, 3, 3)
    torch.testing.assert_close(w5[:, :3], w * 3 / 5)
    torch.testing.assert_close(w5[:, 3:], w[:, :2] * 3 / 5)
    assert adapt_input_conv(w, 3) is w


def test_local_file_weights_are_adapted_too(tmp_path: Path) -> None:
    torch.manual_seed(6)
    ref = torchvision.models.shufflenet_v2_x1_0(weights=None)
    path = tmp_path / "shufflenet.pt"
    torch.save(ref.state_dict(), path)
    net = build_backbone(BackboneConfig(name="shufflenet_v2_x1_0", weights=str(path), small_input=False),
                         (1, 64, 64), False)
    torch.testing.assert_close(net.conv1[0].weight, ref.conv1[0].weight.sum(dim=1, keepdim=True))
    assert torch.equal(net.stage4[0].branch1[0].weight, ref.stage4[0].branch1[0].weight)


def test_timm_pretrained_loads_from_the_hugging_face_cache_offline(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")
    from huggingface_hub import constants
    from safetensors.torch import save_file

    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"  # the cache layout huggingface_hub reads
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(10)
    ref = timm.create_model("resnet18", pretrained=False)
    save_file(ref.state_dict(), str(snapshot / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    net = build_backbone(BackboneConfig(name="timm:resnet18", weights="pretrained"), (1, 32, 32), False)
    assert torch.equal(net.net.layer4[0].conv1.weight, ref.layer4[0].conv1.weight)
    torch.testing.assert_close(net.net.conv1.weight, ref.conv1.weight.sum(dim=1, keepdim=True))  # timm's rule


def test_timm_pretrained_offline_error_names_repo_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")

    def offline(*args: Any, **kwargs: Any) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' (test)")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(FileNotFoundError) as err:
        build_backbone(BackboneConfig(name="timm:resnet18", weights="pretrained"), (3, 32, 32), False)
    msg = str(err.value)
    assert "\n" not in msg and "timm/resnet18.a1_in1k" in msg and "snapshot_download(" in msg
    assert "couldn't connect" in msg


# -- backbones and heads ------------------------------------------------------------------------------------
def test_shufflenet_shapes_presets_and_small_input() -> None:
    net = build_backbone(BackboneConfig(name="shufflenet_v2_x1_0"), (3, 224, 224), False)
    assert net.out_dim == 1024
    assert tuple(net.eval()(torch.randn(1, 3, 224, 224)).shape) == (1, 1024, 7, 7)
    small = build_backbone(BackboneConfig(name="shufflenet_v2_x1_0"), (1, 32, 32), False)  # auto: <= 64 px
    assert tuple(small.eval()(torch.randn(2, 1, 32, 32)).shape) == (2, 1024, 4, 4)
    from mola.inject import resolve_targets

    last = resolve_targets(net, "last_stage")
    every = resolve_targets(net, "all_stages")
    assert last and all(n.startswith("stage4.") for n in last)
    assert {n.split(".")[0] for n in every} == {"stage2", "stage3", "stage4"}
    assert len(every) > len(last)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and n.split(".")[0].startswith("stage")]
    assert sorted(every) == sorted(convs)  # every stage conv, depthwise ones included
    with pytest.raises(ValueError, match="no dilated variant"):
        build_backbone(BackboneConfig(name="shufflenet_v2_x1_0", dilated=True), (3, 64, 64), True)


def test_shufflenet_mola_grad_equals_plain_at_init_and_matches_the_reference() -> None:
    torch.manual_seed(7)
    plain = build_backbone(BackboneConfig(name="shufflenet_v2_x1_0"), (3, 32, 32), False).double().eval()
    import copy

    mola = inject(copy.deepcopy(plain), MoLAConfig(num_experts=3, rank=2, target_modules="all_stages"))
    mola.eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ids = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(mola(x, task_ids=ids), plain(x), rtol=0, atol=1e-12)  # B = 0: the plain model
    layers = mola.mola_layers()
    assert any(layer.base_layer.groups > 1 for layer in layers.values())  # depthwise convs are wrapped
    gen = torch.Generator().manual_seed(8)
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen, dtype=torch.float64))
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: inputs.__setitem__(n, (i[0], o)))
             for n, m in layers.items()]
    with torch.no_grad():
        out = mola(x, task_ids=ids)
    for h in hooks:
        h.remove()
    weights = F.one_hot(ids, 3).double()
    checked = 0
    for name, layer in layers.items():
        assert isinstance(layer, MoLAConv2d)
        xin, got = inputs[name]
        torch.testing.assert_close(got, hand_reference(layer, xin, weights), rtol=1e-9, atol=1e-9, msg=name)
        checked += 1
    assert checked == len(layers) > 10
    assert (out - plain(x)).abs().max() > 1e-3  # the adapters do change the output


def test_vit_b16_size_and_forward() -> None:
    net = build_backbone(BackboneConfig(name="vit_b_16"), (3, 32, 32), False)
    # torchvision's ViT-B/16 at 224 px has 86,567,656 parameters; minus its 768x1000 classifier and the
    # 192 position embeddings of the 196 - 4 patches a 32 px input does not have
    assert sum(p.numel() for p in net.parameters()) == 86_567_656 - (768 * 1000 + 1000) - 192 * 768
    net.eval()
    with torch.no_grad():
        assert tuple(net(torch.randn(2, 3, 32, 32)).shape) == (2, 768)
        net.dense, net.output = True, "map"
        assert tuple(net(torch.randn(2, 3, 32, 32)).shape) == (2, 768, 2, 2)
    from mola.inject import resolve_targets

    last = resolve_targets(net, "last_stage")
    assert {n.split(".")[2] for n in last} == {"encoder_layer_9", "encoder_layer_10", "encoder_layer_11"}
    assert all(".mlp." in n for n in last)


def test_pspnet_head_shape_backward_and_normals() -> None:
    torch.manual_seed(9)
    head = PSPHead(64, 13, hidden=32)
    feats = torch.randn(2, 64, 6, 8, requires_grad=True)
    y = head(feats, (48, 64))  # x8 upsampling to the input size
    assert tuple(y.shape) == (2, 13, 48, 64)
    y.square().mean().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert [level[0].output_size for level in head.pyramid] == [1, 2, 3, 6]
    normals = PSPHead(64, 3, hidden=32, normalize=True).eval()(feats.detach(), (12, 16))
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2, 12, 16))


def test_model_head_pspnet_for_dense_tasks_only() -> None:
    spec = ScenarioSpec("toy", "single_input", [], (3, 32, 32))
    from mola.data.layouts.nyuv2 import TASKS

    spec.tasks = [TASKS["segmentation"], TASKS["depth"], TASKS["normal"]]
    scenario = synthetic_scenario(spec, per_task=2)
    cfg = ModelConfig(arch="hps", head="pspnet", head_hidden=16,
                      backbone=BackboneConfig(name="small_cnn", width=8))
    model = build_model(scenario, cfg)
    assert all(isinstance(h, PSPHead) for h in model.heads)
    out = model(torch.randn(2, 3, 32, 32), torch.full((2,), -1))
    assert [tuple(out[t].shape) for t in range(3)] == [(2, 13, 32, 32), (2, 1, 32, 32), (2, 3, 32, 32)]
    sum(o.mean() for o in out.values()).backward()
    classify = synthetic_scenario(ScenarioSpec("c", "domain", [mola_task("a"), mola_task("b")], (3, 16, 16),
                                               shared_head=True))
    assert not any(isinstance(h, PSPHead) for h in build_model(classify, cfg).heads)
    with pytest.raises(ValueError, match="model.head"):
        load_config(None, ["model.head=unet"])


def mola_task(name: str) -> Any:
    from mola.data.base import TaskInfo

    return TaskInfo(name, "classification", 3)


# -- data presets --------------------------------------------------------------------------------------------
MED9 = ["pathmnist", "octmnist", "organcmnist", "bloodmnist", "breastmnist", "dermamnist", "organamnist",
        "organsmnist", "pneumoniamnist"]


def test_medmnist9_preset(tmp_path: Path) -> None:
    classes = {"pathmnist": 9, "octmnist": 4, "organcmnist": 11, "bloodmnist": 8, "breastmnist": 2,
               "dermamnist": 7, "organamnist": 11, "organsmnist": 11, "pneumoniamnist": 2}
    for i, stem in enumerate(MED9):
        make_npz(tmp_path / f"{stem}.npz", (6, 2, 2), classes[stem], rgb=stem in ("pathmnist", "bloodmnist",
                                                                                  "dermamnist"), seed=i)
    (tmp_path / "retinamnist.npz").write_bytes((tmp_path / "breastmnist.npz").read_bytes())  # not one of the nine
    sc = build_scenario(DataConfig(kind="medmnist9", root=str(tmp_path), image_size=32))
    assert [t.name for t in sc.tasks] == ["path", "oct", "organc", "blood", "breast", "derma", "organa", "organs",
                                          "pneumonia"]
    assert [t.num_classes for t in sc.tasks] == [classes[s] for s in MED9]
    assert sc.input_shape == (3, 32, 32)
    x, _, t = sc.val[2]  # oct (2 val images per task): gray, tiled to RGB
    assert t == 1 and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    raw = np.load(tmp_path / "octmnist.npz")["val_images"][0].astype(np.float32) / 255.0
    want = F.interpolate(torch.from_numpy((raw - 0.5) / 0.5)[None, None], size=(32, 32), mode="bilinear",
                         align_corners=False, antialias=False)[0, 0]
    torch.testing.assert_close(x[0], want)  # mean/std 0.5, resized to the preset size
    base = sc.train.inputs[0]
    from mola.data.transforms import resize_tensor

    resized = resize_tensor(base, 32)
    torch.manual_seed(0)
    draws = [sc.train[0][0] for _ in range(12)]
    flipped = [torch.equal(d, resized.flip(-1)) for d in draws]
    assert all(f or torch.equal(d, resized) for f, d in zip(flipped, draws, strict=True))
    assert 0 < sum(flipped) < 12  # a random horizontal flip on train only
    assert torch.equal(sc.val[0][0], sc.val[0][0])
    (tmp_path / "organsmnist.npz").unlink()
    with pytest.raises(FileNotFoundError, match="organsmnist.npz"):
        build_scenario(DataConfig(kind="medmnist9", root=str(tmp_path)))


def test_paper_augment_recipe() -> None:
    train = ImageFileTransform(224, augment=True, recipe="paper").pipeline.transforms
    crop = train[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.7, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(train[1], T.RandomHorizontalFlip)
    jitter = train[2]
    assert isinstance(jitter, T.ColorJitter) and jitter.brightness == (0.6, 1.4) and jitter.saturation == (0.6, 1.4)
    assert isinstance(train[3], T.RandomGrayscale)
    test = ImageFileTransform(224, augment=False, recipe="paper").pipeline.transforms
    assert isinstance(test[0], T.Resize) and test[0].size == 256
    assert isinstance(test[1], T.CenterCrop) and test[1].size == (224, 224)
    assert load_config(None, ["data.augment=paper"]).data.augment == "paper"
    assert load_config(None, ["data.augment=true"]).data.augment is True
    with pytest.raises(ValueError, match="data.augment"):
        load_config(None, ["data.augment=strong"])


def test_folder_presets_check_the_class_count(tmp_path: Path) -> None:
    from fixtures_data import make_image_tree

    root = make_image_tree(tmp_path / "vlcs", {"A": {"c1": 4, "c2": 4}, "B": {"c1": 4, "c2": 4}})
    with pytest.raises(ValueError, match="2 class folders.*vlcs has 5"):
        build_scenario(DataConfig(kind="vlcs", root=str(root), image_size=16))


def test_step_scheduler_halves_every_step_epochs() -> None:
    cfg = load_config(None, ["optim.name=adam", "optim.lr=0.1", "optim.scheduler=step", "optim.step_epochs=2",
                             "optim.step_gamma=0.5"])
    p = nn.Parameter(torch.zeros(1))
    opt, sched = build_optimizer(cfg, [p], "single_input", steps_total=30, steps_per_epoch=3)
    lrs = []
    for _ in range(13):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:6] == [0.1] * 6 and lrs[6:12] == [0.05] * 6 and lrs[12] == 0.025


# -- model selection on the test loss ------------------------------------------------------------------------
def test_select_on_test_loss_is_marked_everywhere(tmp_path: Path) -> None:
    spec = ScenarioSpec("toy", "domain", [mola_task("a"), mola_task("b")], (6,), shared_head=True)
    scenario = synthetic_scenario(spec, per_task=12, seed=1)
    cfg = load_config(None, ["model.backbone.name=mlp", "model.backbone.width=4", "train.epochs=3",
                             "train.select_on=test_loss", "train.progress=false", "train.tensorboard=false",
                             "data.batch_size=8", "optim.lr=0.01"])
    with pytest.warns(RuntimeWarning, match="NOT a valid protocol"):
        trainer = Trainer(cfg, tmp_path / "run", scenario=scenario)
    final = trainer.fit()
    assert final["selection"]["on"] == "test_loss" and final["selection"]["valid_protocol"] is False
    assert "NOT a valid protocol" in json.loads((tmp_path / "run" / "final.json").read_text())["selection"]["note"]
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert all("NOT a valid protocol" in r["selected_on"] for r in rows)
    test_loss = [np.mean([float(r["test/a/loss"]), float(r["test/b/loss"])]) for r in rows]
    assert final["best_epoch"] == int(np.argmin(test_loss))  # the epoch of the lowest mean test loss
    default = load_config(None, [])
    assert default.train.select_on == "val"


def test_single_task_combined_final_says_how_it_selected() -> None:
    from mola.engine.single_task import combine_finals

    res = {"a": {"acc": 0.5, "loss": 1.0}}
    finals = {"a": {"val": res, "test": res, "best_epoch": 1, "last": {"val": res, "test": res}, "epochs": 2,
                    "seconds_per_epoch": 1.0, "parameters": {"total": 10}}}
    bad = combine_finals(load_config(None, ["train.select_on=test_loss"]), finals, {})
    assert bad["selection"]["valid_protocol"] is False and "NOT a valid protocol" in bad["selection"]["note"]
    good = combine_finals(load_config(None, []), finals, {})
    assert good["selection"] == {"on": "val", "valid_protocol": True, "note": "val (auto)"}


# -- every paper config builds; the smoke check ---------------------------------------------------------------
@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[Path(p).stem for p in PAPER_CONFIGS])
def test_paper_config_builds_without_data(path: str, offline_hub: Path) -> None:
    cfg = load_config(path)
    spec = scenario_spec(cfg.data)
    assert spec is not None and not Path(cfg.data.root).exists()
    summary = dry_run(cfg, "unused", synthetic=True)
    assert summary["data"].startswith("synthetic stand-in")
    assert summary["input_shape"] == list(spec.input_shape)
    if cfg.model.backbone.weights:
        assert "not cached" in summary["weights"] and str(offline_hub) in summary["weights"]
    assert summary["parameters"]["total"] > 1e6
    assert summary["selection"].startswith("val")


def test_paper_configs_cover_the_benchmarks() -> None:
    stems = {Path(p).stem for p in PAPER_CONFIGS}
    for bench in ("medmnist9", "radimagenet", "vlcs", "office_home", "nyuv2"):
        assert {f"{bench}_grad", f"{bench}_router"} <= stems
    nyu = load_config(ROOT / "configs/paper/nyuv2_grad.yaml")
    assert nyu.model.head == "pspnet" and nyu.model.backbone.name == "resnet50" and nyu.data.batch_size == 2
    assert (nyu.optim.name, nyu.optim.lr, nyu.optim.scheduler, nyu.optim.step_epochs) == ("adam", 1e-4, "step", 100)
    med = load_config(ROOT / "configs/paper/medmnist9_router.yaml")
    assert (med.optim.name, med.optim.lr, med.optim.scheduler, med.train.epochs, med.data.batch_size) == \
        ("sgd", 0.05, "cosine", 100, 128)
    vlcs = load_config(ROOT / "configs/paper/vlcs_grad.yaml")
    assert (vlcs.optim.name, vlcs.train.epochs, vlcs.data.batch_size, vlcs.data.augment) == ("adamw", 10, 32, "paper")
    assert load_config(ROOT / "configs/paper/office_home_grad.yaml").train.epochs == 60


@pytest.mark.parametrize("path", PAPER_SWEEPS, ids=[Path(p).stem for p in PAPER_SWEEPS])
def test_paper_sweep_rows_are_valid_configs(path: str) -> None:
    from mola.cli.sweep import load_sweep, plan_sweep
    from mola.engine.trainer import validate_names
    from mola.models.weights import named_weights_status

    spec = load_sweep(path)
    plan = plan_sweep(spec)
    labels = {r.override_label for r in plan}
    assert {"single_task", "hps", "mola_grad", "mola_router"} <= labels
    assert all(r.status != "invalid" for r in plan), [(r.name, r.reason) for r in plan if r.status == "invalid"]
    for run in plan:
        cfg = load_config(spec.base, run.overrides, arch=run.arch, weighting=run.weighting, method=run.method)
        validate_names(cfg)
        named_weights_status(cfg.model.backbone)


def test_dry_run_of_a_single_task_row_builds_its_networks() -> None:
    cfg = load_config(ROOT / "configs/paper/radimagenet_grad.yaml", ["model.arch=single_task"])
    summary = dry_run(cfg, "unused", synthetic=True)
    plain = dry_run(load_config(ROOT / "configs/paper/radimagenet_grad.yaml", ["model.arch=hps"]), "unused",
                    synthetic=True)
    assert summary["arch"].startswith("single_task (one run per task")
    tasks = len(summary["tasks"])
    assert summary["parameters"]["total"] - summary["parameters"]["heads"] == \
        tasks * (plain["parameters"]["total"] - plain["parameters"]["heads"])  # T backbones


def test_train_dry_run_cli_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          offline_hub: Path) -> None:
    from mola.cli.main import main

    out = tmp_path / "run"
    assert main(["train", "--config", str(ROOT / "configs/paper/radimagenet_router.yaml"), "--dry-run",
                 "--synthetic", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "synthetic stand-in of radimagenet" in text and "shufflenet_v2_x1_0" in text
    assert not out.exists()


@pytest.mark.slow
def test_paper_smoke_tiny_on_cpu(capsys: pytest.CaptureFixture[str], offline_hub: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import paper_smoke
    finally:
        sys.path.pop(0)
    assert paper_smoke.main(["--device", "cpu", "--tiny"]) == 0
    text = capsys.readouterr().out
    for path in PAPER_CONFIGS:
        line = next(ln for ln in text.splitlines() if ln.startswith(Path(path).stem + " "))
        step_ms = float(line.split()[4])
        assert step_ms > 0
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.strip()}
    for bench in ("medmnist9", "nyuv2", "vlcs", "office_home"):
        assert "runs x mean" in lines[bench] and float(lines[bench].split()[2]) > 0
    assert "unknown train size" in lines["radimagenet"]  # no known RadImageNet subset size
