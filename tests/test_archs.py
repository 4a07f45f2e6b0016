"""Tests of the multi-task architectures: output shapes per scenario kind, each arch's defining property,
gradient flow, parameter groups, and a short training run on real MedMNIST images."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.data.base import ArrayTaskDataset, Heterogeneity, Scenario, TaskInfo
from mola.inject import MoLAConfig
from mola.models import ARCHS, BackboneConfig, ModelConfig, build_backbone, build_model, num_parameters, task_rows
from mola.models.archs.cross_stitch import backbone_stages, run_stages, stage_shapes
from mola.models.base import MultiTaskModel

MEDMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"  # ../shared next to the checkout


# name -> (registered arch, ModelConfig extras)
ARCH_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "hps": ("hps", {}),
    "single_task": ("single_task", {}),
    "mola_grad": ("mola", {"mola": MoLAConfig(mode="grad")}),
    "mola_router": ("mola", {"mola": MoLAConfig(mode="router", router_input_size=14)}),
    "cross_stitch": ("cross_stitch", {}),
    "mmoe": ("mmoe", {}),
    "cgc": ("cgc", {}),
    "dselect_k": ("dselect_k", {}),
    "ltb": ("ltb", {}),
    "mtan": ("mtan", {}),
}
NEW_ARCHS = ["cross_stitch", "mmoe", "cgc", "dselect_k", "ltb", "mtan"]


def small_cnn(width: int = 8) -> BackboneConfig:
    return BackboneConfig(name="small_cnn", width=width)


def mlp() -> BackboneConfig:
    return BackboneConfig(name="mlp", options={"hidden": [32, 16]})


def model_cfg(case: str, backbone: BackboneConfig | None = None, **options: Any) -> ModelConfig:
    arch, extra = ARCH_CASES[case]
    return ModelConfig(arch=arch, backbone=backbone or small_cnn(), options=options, head_hidden=8, **extra)


def scenario(kind: Heterogeneity, size: int = 16, channels: int = 1) -> Scenario:
    """A tiny synthetic scenario of each heterogeneity kind (only tasks and input shape matter to models)."""
    if kind == "domain":
        tasks = [TaskInfo(f"d{i}", num_classes=3) for i in range(3)]
    elif kind == "multi_input":
        tasks = [TaskInfo("a", num_classes=2), TaskInfo("b", num_classes=3), TaskInfo("c", num_classes=4)]
    else:
        tasks = [TaskInfo("cls", num_classes=3), TaskInfo("seg", "segmentation", num_classes=4),
                 TaskInfo("depth", "depth")]
    ds = ArrayTaskDataset(torch.zeros(3, channels, size, size), torch.zeros(3), [0, 0, 0])
    return Scenario(f"tiny_{kind}", kind, tasks, ds, ds, ds, (channels, size, size),
                    shared_head=kind == "domain")


def batch(sc: Scenario, n: int = 10, ids: list[int] | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *sc.input_shape, generator=g)
    if sc.heterogeneity == "single_input":
        return x, torch.full((n,), -1, dtype=torch.long)
    pool = torch.tensor(ids if ids is not None else list(range(sc.num_tasks)))
    task_ids = pool[torch.arange(n) % len(pool)]
    return x, task_ids[torch.randperm(n, generator=g)]


def expected_shape(task: TaskInfo, rows: int, size: int) -> tuple[int, ...]:
    if task.kind == "classification":
        return (rows, task.out_channels)
    return (rows, task.out_channels, size, size)


def check_outputs(sc: Scenario, out: dict[int, Tensor], task_ids: Tensor) -> None:
    size = sc.input_shape[-1]
    if sc.heterogeneity == "single_input":
        assert sorted(out) == list(range(sc.num_tasks))
        for t, y in out.items():
            assert tuple(y.shape) == expected_shape(sc.tasks[t], len(task_ids), size)
        return
    rows = task_rows(task_ids, sc.num_tasks)
    assert sorted(out) == sorted(rows)
    for t, y in out.items():
        assert tuple(y.shape) == expected_shape(sc.tasks[t], len(rows[t]), size)


# --- shapes on every scenario kind ---------------------------------------------------------------------


@pytest.mark.parametrize("case", list(ARCH_CASES))
@pytest.mark.parametrize("kind", ["domain", "multi_input", "single_input"])
def test_shapes_small_cnn(case: str, kind: Heterogeneity) -> None:
    torch.manual_seed(0)
    sc = scenario(kind)
    model = build_model(sc, model_cfg(case))
    ids = [0, 2] if kind == "multi_input" else None  # task 1 absent from the batch
    x, task_ids = batch(sc, ids=ids)
    for train in (True, False):
        model.train(train)
        out = model(x, task_ids)
        check_outputs(sc, out, task_ids)
    if case in NEW_ARCHS or case == "hps":
        assert model.features is not None


@pytest.mark.parametrize("case", list(ARCH_CASES))
@pytest.mark.parametrize("kind", ["domain", "multi_input"])
def test_shapes_mlp(case: str, kind: Heterogeneity) -> None:
    torch.manual_seed(0)
    sc = scenario(kind)
    model = build_model(sc, model_cfg(case, mlp()))
    x, task_ids = batch(sc, ids=[1, 2] if kind == "multi_input" else None)
    for train in (True, False):
        model.train(train)
        check_outputs(sc, model(x, task_ids), task_ids)


@pytest.mark.parametrize("case", NEW_ARCHS + ["hps", "mola_grad", "mola_router", "single_task"])
def test_task_with_a_single_row_trains(case: str) -> None:
    """BatchNorm in training needs 2+ samples: a task present once in a batch must not break the forward."""
    sc = scenario("multi_input")
    model = build_model(sc, model_cfg(case, mlp())).train()
    x = torch.randn(6, *sc.input_shape)
    task_ids = torch.tensor([0, 0, 1, 0, 2, 2])
    out = model(x, task_ids)
    check_outputs(sc, out, task_ids)
    full_batch_loss(out).backward()


def test_single_task_lone_row_uses_running_stats_and_keeps_train_mode() -> None:
    """single_task: task 1's tower sees one row; it equals that tower in eval mode, and its BatchNorm stays in
    training mode with unchanged running statistics (nothing silently updated from a batch of one)."""
    sc = scenario("multi_input")
    no_dropout = BackboneConfig(name="mlp", options={"hidden": [32, 16], "dropout": 0.0})
    model = build_model(sc, model_cfg("single_task", no_dropout)).train()
    tower = model.towers[1]
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    x = torch.randn(4, *sc.input_shape)
    out = model(x, torch.tensor([0, 1, 0, 2]))
    assert all(m.training for m in tower.modules())
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items() if "num_batches" not in k)
    tower.eval()
    ref = model.heads[1](tower(x[1:2]), model.out_size(x))
    assert torch.allclose(out[1], ref)


@pytest.mark.parametrize("case,options", [
    ("cross_stitch", {"per_channel": False, "alpha_self": 0.5}),
    ("mmoe", {"num_experts": 2, "expert_from_stage": 3, "gate_pool": 0}),
    ("cgc", {"num_shared": 1, "num_specific": 2, "expert_from_stage": 2}),
    ("cgc", {"num_shared": 1, "num_specific": 0}),
    ("dselect_k", {"num_experts": 5, "k": 3, "per_example": False, "expert_from_stage": 1}),
    ("ltb", {"branches": [1, 1, 2, 2, 3], "hard_train": True}),
    ("mtan", {"reduction": 4}),
])
def test_options_variants(case: str, options: dict[str, Any]) -> None:
    for kind in ("multi_input", "single_input"):
        sc = scenario(kind)
        model = build_model(sc, model_cfg(case, **options))
        x, task_ids = batch(sc)
        out = model(x, task_ids)
        check_outputs(sc, out, task_ids)
        sum(y.square().mean() for y in out.values()).backward()


@pytest.mark.parametrize("case", NEW_ARCHS)
def test_bad_options_are_errors(case: str) -> None:
    with pytest.raises(ValueError, match=case):
        build_model(scenario("multi_input"), model_cfg(case, no_such_option=1))


@pytest.mark.parametrize("case,options", [
    ("mmoe", {"expert_from_stage": 5}), ("mmoe", {"num_experts": 0}), ("dselect_k", {"k": 5}),
    ("ltb", {"branches": [1, 2]}), ("cross_stitch", {"alpha_self": 1.5}), ("cgc", {"num_shared": 0}),
])
def test_invalid_option_values(case: str, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=case):
        build_model(scenario("multi_input"), model_cfg(case, **options))


def test_stage_arch_rejects_unsplittable_backbone() -> None:
    with pytest.raises(ValueError, match="cannot split"):
        backbone_stages(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


# --- stage helper -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,dense", [
    ("small_cnn", (1, 16, 16), False), ("small_cnn", (3, 16, 16), True), ("mlp", (1, 8, 8), False),
    ("resnet18", (3, 16, 16), True), ("vit_small", (3, 16, 16), False), ("vit_small", (3, 16, 16), True),
])
def test_backbone_stages_compose_to_backbone(name: str, shape: tuple[int, ...], dense: bool) -> None:
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(name=name, width=8), shape, dense).eval()
    stages = backbone_stages(net)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.allclose(run_stages(stages, x), net(x), atol=1e-5)
    shapes = stage_shapes(stages, shape)
    assert shapes[-1][0] == net.out_dim
    assert {id(p) for p in stages.parameters()} == {id(p) for p in net.parameters()}


# --- defining properties ----------------------------------------------------------------------------------


def test_cross_stitch_identity_alpha_gives_independent_towers() -> None:
    torch.manual_seed(0)
    sc = scenario("multi_input")
    model = build_model(sc, model_cfg("cross_stitch", alpha_self=1.0)).eval()
    for a in model.stitches:
        assert torch.equal(a, torch.eye(sc.num_tasks).expand_as(a))
    x, task_ids = batch(sc, n=12)
    with torch.no_grad():
        out = model(x, task_ids)
        for t, rows in task_rows(task_ids, sc.num_tasks).items():
            alone = model.heads[t](run_stages(model.columns[t], x[rows]))
            assert torch.allclose(out[t], alone, atol=1e-5)
        # any off-diagonal weight makes the towers talk
        model.stitches[-1].data.fill_(1.0 / sc.num_tasks)
        mixed = model(x, task_ids)
        assert not torch.allclose(mixed[0], out[0], atol=1e-4)


def test_cross_stitch_init_matches_alpha_self() -> None:
    model = build_model(scenario("multi_input"), model_cfg("cross_stitch", alpha_self=0.8))
    a = model.stitches[0][0]
    assert torch.allclose(a.diagonal(), torch.full((3,), 0.8))
    assert torch.allclose(a.sum(dim=1), torch.ones(3))
    assert model.stitches[0].shape[0] == 8  # per channel: stem width


@pytest.mark.parametrize("kind", ["multi_input", "single_input"])
def test_mmoe_gates_are_distributions(kind: Heterogeneity) -> None:
    sc = scenario(kind)
    model = build_model(sc, model_cfg("mmoe", num_experts=3))
    x, task_ids = batch(sc, n=12)
    model(x, task_ids)
    rows = task_rows(task_ids, sc.num_tasks) if kind == "multi_input" else None
    for t, w in model.gate_weights.items():
        assert w.shape == (12 if rows is None else len(rows[t]), 3)
        assert (w >= 0).all() and torch.allclose(w.sum(dim=1), torch.ones(len(w)))
    assert model.features is not None and model.features.shape[:2] == (12, 3)


def test_cgc_task_gates_see_only_shared_and_own_experts() -> None:
    torch.manual_seed(0)
    sc = scenario("multi_input")
    model = build_model(sc, model_cfg("cgc", num_shared=2, num_specific=1)).eval()
    x, task_ids = batch(sc, n=12)
    with torch.no_grad():
        before = model(x, task_ids)
        for w in model.gate_weights.values():
            assert w.shape[1] == 3 and (w >= 0).all() and torch.allclose(w.sum(dim=1), torch.ones(len(w)))
        for p in model.specific[1].parameters():  # change task 1's own expert only
            p.add_(torch.randn_like(p))
        after = model(x, task_ids)
    assert torch.allclose(before[0], after[0]) and torch.allclose(before[2], after[2])
    assert not torch.allclose(before[1], after[1])


@pytest.mark.parametrize("num_experts,k,per_example", [(4, 2, True), (5, 2, True), (8, 3, False)])
def test_dselect_k_selects_at_most_k_after_annealing(num_experts: int, k: int, per_example: bool) -> None:
    torch.manual_seed(0)
    sc = scenario("multi_input")
    model = build_model(sc, model_cfg("dselect_k", num_experts=num_experts, k=k, per_example=per_example))
    x, task_ids = batch(sc, n=12)
    model(x, task_ids)
    for w in model.gate_weights.values():  # smooth region: a dense distribution
        assert (w >= 0).all() and torch.allclose(w.sum(dim=1), torch.ones(len(w)))
    before = model.extra_loss()
    assert before is not None and before.item() > 0
    gamma = model.options.gamma
    with torch.no_grad():  # saturate every smooth step: |z| >= gamma / 2
        for gate in model.gates:
            if per_example:
                gate.z.weight.zero_()
                gate.z.bias.copy_(torch.randn_like(gate.z.bias).sign() * gamma)
            else:
                gate.z_logits.copy_(torch.randn_like(gate.z_logits).sign() * gamma)
    model(x, task_ids)
    for w in model.gate_weights.values():
        assert ((w > 0).sum(dim=1) <= k).all()
        assert torch.allclose(w.sum(dim=1), torch.ones(len(w)))
    assert model.extra_loss().item() == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():  # inference skips unselected experts
        model.eval()
        model(x, task_ids)
    used = torch.stack([w.gt(0).any(0) for w in model.gate_weights.values()]).any(0)
    assert model.features is not None
    assert (model.features[:, ~used] == 0).all()


def test_ltb_eval_follows_argmax_paths() -> None:
    torch.manual_seed(0)
    sc = scenario("multi_input")
    model = build_model(sc, model_cfg("ltb", eval_argmax=True))
    with torch.no_grad():
        for p in model.branch_logits.values():
            p.normal_()
    model.eval()
    logits = model.branch_logits
    num_stages = len(model.branches)
    x, task_ids = batch(sc, n=12)
    with torch.no_grad():
        out = model(x, task_ids)
        for t, rows in task_rows(task_ids, sc.num_tasks).items():
            node, path = int(logits["heads"][t].argmax()), []
            for s in range(num_stages - 1, -1, -1):
                path.append(node)
                if s > 0:
                    node = int(logits[f"stage{s}"][node].argmax()) if f"stage{s}" in logits else 0
            path.reverse()
            assert model.paths()[t] == path
            h = x
            for s, j in enumerate(path):
                h = model.nodes[s][j](h)
            assert torch.allclose(out[t], model.heads[t](h[rows]), atol=1e-6)


def test_ltb_default_eval_is_the_noise_free_mixture() -> None:
    """Default eval mixes parents with softmax(logits / temperature), computed here node by node; the argmax
    eval (eval_argmax) of near-uniform logits runs a different network (it was at chance on the 8-task run)."""
    torch.manual_seed(0)
    sc = scenario("multi_input")
    model = build_model(sc, model_cfg("ltb", tau=2.0)).eval()
    with torch.no_grad():
        for p in model.branch_logits.values():
            p.normal_()
    x, task_ids = batch(sc, n=12)
    with torch.no_grad():
        out = model(x, task_ids)
        outs = [node(x) for node in model.nodes[0]]
        for s in range(1, len(model.branches) + 1):
            key = f"stage{s}" if s < len(model.branches) else "heads"
            children = model.branches[s] if s < len(model.branches) else sc.num_tasks
            if key in model.branch_logits:
                w = torch.softmax(model.branch_logits[key].double() / 2.0, -1)
                inputs = [sum(float(w[c, p]) * outs[p] for p in range(len(outs))) for c in range(children)]
            else:
                inputs = [outs[0]] * children
            if s == len(model.branches):
                break
            outs = [model.nodes[s][c](inputs[c]) for c in range(children)]
        for t, rows in task_rows(task_ids, sc.num_tasks).items():
            assert torch.allclose(out[t], model.heads[t](inputs[t][rows]), atol=1e-5)
        argmax = build_model(sc, model_cfg("ltb", tau=2.0, eval_argmax=True)).eval()
        argmax.load_state_dict(model.state_dict())
        other = argmax(x, task_ids)
    assert any(not torch.allclose(out[t], other[t], atol=1e-3) for t in out)


def test_ltb_temperature_anneals_and_is_checkpointed() -> None:
    sc = scenario("multi_input")
    model = build_model(sc, model_cfg("ltb", tau=5.0, tau_min=1.0, anneal_rate=0.5))
    x, task_ids = batch(sc)
    model.train()
    model(x, task_ids)
    assert model.temperature == pytest.approx(5.0 * np.exp(-0.5))
    for _ in range(10):
        model(x, task_ids)
    assert model.temperature == pytest.approx(1.0)
    model.set_temperature(2.5)
    other = build_model(sc, model_cfg("ltb"))
    other.load_state_dict(model.state_dict())
    assert other.temperature == pytest.approx(2.5)


@pytest.mark.parametrize("kind", ["multi_input", "single_input"])
def test_mtan_masks_in_unit_interval_and_ones_give_shared(kind: Heterogeneity) -> None:
    torch.manual_seed(0)
    sc = scenario(kind)
    model = build_model(sc, model_cfg("mtan")).eval()
    x, task_ids = batch(sc, n=12)
    with torch.no_grad():
        model(x, task_ids)
        assert set(model.masks)
        for masks in model.masks.values():
            for m in masks:
                assert m.min() >= 0 and m.max() <= 1
        for per_task in model.attention:
            for att in per_task:
                att[-1].weight.zero_()
                att[-1].bias.fill_(100.0)  # sigmoid(100) == 1 in float32
        out = model(x, task_ids)
        shared = run_stages(model.stages, x)
        assert all(bool((m == 1).all()) for ms in model.masks.values() for m in ms)
        if kind == "single_input":
            for t in range(sc.num_tasks):
                assert torch.equal(model.features[t], shared)
                assert torch.allclose(out[t], model.heads[t](shared, (16, 16)))
        else:
            for t, rows in task_rows(task_ids, sc.num_tasks).items():
                assert torch.allclose(out[t], model.heads[t](shared[rows]), atol=1e-6)


# --- gradients and parameter groups ----------------------------------------------------------------------


def full_batch_loss(out: dict[int, Tensor]) -> Tensor:
    return sum(y.float().square().mean() for y in out.values())  # type: ignore[return-value]


@pytest.mark.parametrize("case", list(ARCH_CASES))
@pytest.mark.parametrize("kind", ["multi_input", "single_input"])
def test_gradients_reach_every_parameter(case: str, kind: Heterogeneity) -> None:
    torch.manual_seed(0)
    sc = scenario(kind)
    model = build_model(sc, model_cfg(case)).train()
    x, task_ids = batch(sc, n=12)
    out = model(x, task_ids)
    loss = full_batch_loss(out)
    extra = model.extra_loss()
    if extra is not None:
        loss = loss + extra
    if model.features is not None:  # the shared representation is part of the graph ("-UB" methods)
        (g,) = torch.autograd.grad(loss, model.features, retain_graph=True)
        assert g.abs().sum() > 0
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if case == "mola_router" and kind == "single_input":  # documented: the lift only feeds TwD, which
        missing = [n for n in missing if not n.startswith("encoder.lift.")]  # single-input skips
    assert not missing, f"{case}: no gradient for {missing}"


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_parameter_groups_partition_the_model(case: str) -> None:
    model = build_model(scenario("multi_input"), model_cfg(case))
    groups = model.parameter_groups()
    counts = num_parameters(model)
    assert set(counts) == set(groups) | {"total"}
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert "heads" in groups and "heads" in model.task_specific_groups
    shared, task = model.shared_parameters(), model.task_parameters()
    assert len(shared) + len(task) == len(list(model.parameters()))
    assert bool(shared) == (case != "single_task")  # every multi-task arch shares something


def test_router_mode_adapters_are_shared_grad_mode_adapters_task_specific() -> None:
    """Router mode mixes every adapter into every sample, so gradient methods must combine their gradients."""
    for case, adapters_shared in (("mola_router", True), ("mola_grad", False)):
        model = build_model(scenario("multi_input"), model_cfg(case))
        adapters = {id(p) for p in model.encoder.adapter_parameters().values()}
        shared = {id(p) for p in model.shared_parameters()}
        task = {id(p) for p in model.task_parameters()}
        assert adapters and (adapters <= shared) == adapters_shared and (adapters <= task) != adapters_shared
        if adapters_shared:  # router and lift are shared as well; only the heads are per task
            assert task == {id(p) for p in model.heads.parameters()}


def test_task_specific_groups_of_new_archs() -> None:
    expect = {"cross_stitch": {"heads"}, "mmoe": {"heads", "gates"}, "cgc": {"heads", "gates", "task_experts"},
              "dselect_k": {"heads", "gates"}, "ltb": {"heads"}, "mtan": {"heads", "attention"}}
    for case, specific in expect.items():
        model = build_model(scenario("multi_input"), model_cfg(case))
        assert set(model.task_specific_groups) == specific
        assert specific <= set(model.parameter_groups())
    assert set(NEW_ARCHS) <= set(ARCHS.names())


# --- short training runs ----------------------------------------------------------------------------------


def _conditioned_batch(n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Two tasks on the same kind of image with opposite labels: label = [mean > 0] for task 0, [mean < 0] for
    task 1 (a shift of +-0.5 makes it learnable in a few steps). Only a model that uses the task id can fit both."""
    sign = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 12, 12, generator=g) + (sign.float() - 0.5).view(-1, 1, 1, 1)
    return x, torch.where(ids == 0, sign, 1 - sign), ids


# cheaper expert counts for the short runs; LTB anneals fast enough for its argmax eval to match training
TRAIN_OPTIONS: dict[str, dict[str, Any]] = {
    "mmoe": {"num_experts": 2}, "cgc": {"num_shared": 1, "num_specific": 1},
    "dselect_k": {"num_experts": 2, "k": 2}, "ltb": {"anneal_rate": 0.05, "branches": [1, 1, 2, 2, 2]},
}


def _train(model: MultiTaskModel, batches: Any, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.2)
    model.train()
    for _ in range(steps):
        x, y, ids = batches()
        out = model(x, ids)
        loss = sum(F.cross_entropy(out[t], y[r]) for t, r in task_rows(ids, model.num_tasks).items())
        extra = model.extra_loss()
        if extra is not None:
            loss = loss + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def _accuracies(model: MultiTaskModel, x: Tensor, y: Tensor, ids: Tensor) -> list[float]:
    with torch.no_grad():
        out = model(x, ids)
    return [(out[t].argmax(1) == y[r]).float().mean().item() for t, r in task_rows(ids, model.num_tasks).items()]


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_short_training_learns_a_task_conditioned_problem(case: str) -> None:
    """Every arch fits two tasks whose labels contradict each other unless the task id is used (chance: 0.5)."""
    torch.manual_seed(0)
    tasks = [TaskInfo("a", num_classes=2), TaskInfo("b", num_classes=2)]
    ds = ArrayTaskDataset(torch.zeros(2, 1, 12, 12), torch.zeros(2), [0, 1])
    sc = Scenario("conditioned", "multi_input", tasks, ds, ds, ds, (1, 12, 12))
    model = build_model(sc, model_cfg(case, small_cnn(4), **TRAIN_OPTIONS.get(case, {})))
    g = torch.Generator().manual_seed(0)
    _train(model, lambda: _conditioned_batch(32, g), steps=40, lr=1e-2)
    accs = _accuracies(model, *_conditioned_batch(256, torch.Generator().manual_seed(1)))
    assert min(accs) > 0.8, f"{case}: accuracies {accs}"


def _load(name: str, split: str, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MEDMNIST / f"{name}.npz")
    x = data[f"{split}_images"][:n].astype(np.float32) / 255.0
    if x.ndim == 4:
        x = x.mean(axis=-1)
    return x[:, None], data[f"{split}_labels"][:n].reshape(-1).astype(np.int64)


def test_short_training_on_real_images_beats_chance() -> None:
    """MoLA-Grad on two real MedMNIST tasks (300 training images each) beats the majority rate on their test sets."""
    names = ["breastmnist", "retinamnist"]
    if not all((MEDMNIST / f"{n}.npz").is_file() for n in names):
        pytest.skip(f"MedMNIST files not found under {MEDMNIST}")
    parts = [_load(n, "train", 300) for n in names]
    test = [_load(n, "test", None) for n in names]
    mean, std = float(np.concatenate([a for a, _ in parts]).mean()), float(np.concatenate([a for a, _ in parts]).std())

    def pack(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Tensor, Tensor, Tensor]:
        xs = torch.from_numpy((np.concatenate([a for a, _ in pairs]) - mean) / std)
        ys = torch.from_numpy(np.concatenate([b for _, b in pairs]))
        return xs, ys, torch.cat([torch.full((len(b),), t) for t, (_, b) in enumerate(pairs)])

    xs, ys, ids = pack(parts)
    ds = ArrayTaskDataset(xs, ys, ids)
    tasks = [TaskInfo("breast", num_classes=2), TaskInfo("retina", num_classes=5)]
    sc = Scenario("medmnist_pair", "multi_input", tasks, ds, ds, ds, (1, 28, 28))
    torch.manual_seed(0)
    model = build_model(sc, model_cfg("mola_grad", small_cnn(8)))
    g = torch.Generator().manual_seed(0)

    def batches() -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.randint(0, len(xs), (64,), generator=g)
        return xs[idx], ys[idx], ids[idx]

    _train(model, batches, steps=80, lr=5e-3)
    chance = float(np.mean([np.bincount(b).max() / len(b) for _, b in test]))
    accs = _accuracies(model, *pack(test))
    assert np.mean(accs) > chance, f"accuracies {accs}, chance {chance}"


def test_single_task_lone_image_row_keeps_batch_statistics() -> None:
    """single_task with a conv tower: a lone row in training is normalised with its own spatial statistics
    (BatchNorm stays in training mode and updates its running stats), like the tower run alone on that row.
    Running statistics for a lone conv row made manytask's breast task diverge."""
    sc = scenario("multi_input")
    model = build_model(sc, model_cfg("single_task", BackboneConfig(name="small_cnn", width=4))).train()
    ref_tower = copy.deepcopy(model.towers[1])  # a training-mode copy run alone on the row
    x = torch.randn(4, 1, 16, 16)
    out = model(x, torch.tensor([0, 1, 0, 2]))
    expect = model.heads[1](ref_tower(x[1:2]), model.out_size(x))
    assert torch.allclose(out[1], expect, atol=1e-6)
    assert all(m.training for m in model.towers[1].modules())
    for a, b in zip(model.towers[1].modules(), ref_tower.modules(), strict=True):
        if isinstance(a, torch.nn.BatchNorm2d):
            assert torch.equal(a.running_mean, b.running_mean)  # both updated from the same single row
            assert not torch.equal(a.running_mean, torch.zeros_like(a.running_mean))
    model.towers[1].eval()
    frozen = model.heads[1](model.towers[1](x[1:2]), model.out_size(x))
    assert not torch.allclose(out[1], frozen, atol=1e-3)  # not the running-statistics output
