"""The fast compute paths of MoLA layers against the per-sample reference, under the settings the benchmarks
use: float64 equality (task-id and dense paths, both layouts, conv + linear), bf16 autocast, channels_last,
torch.compile, and the benchmark scripts' ``--smoke`` runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mola
from mola.layers import MoLALayer

ROOT = Path(__file__).resolve().parents[1]
E = 4
LAYOUTS = ("kernel", "factorized")
# Task 1 absent, task 3 alone: the per-task path must handle both.
IDS = [2, 0, 2, 3, 0, 2, 0]


class SmallNet(nn.Module):
    """Convs that hit every branch of the conv fast paths, a token Linear (B, L, C) and a head Linear (B, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)  # Ci divisible by kh: grouped A step (kernel layout)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)  # Ci not divisible by kh: block-diagonal A (kernel layout)
        self.conv4 = nn.Conv2d(8, 5, 1)
        self.tok = nn.Linear(5, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        h = self.conv4(h)  # (B, 5, H, W)
        t = self.tok(h.flatten(2).transpose(1, 2))  # (B, H*W, 5)
        return self.fc(F.relu(t).mean(1))


TARGETS = ["conv1", "conv2", "conv3", "conv4", "tok", "fc"]


def make_model(layout: str, dtype: torch.dtype = torch.float64, mode: str = "grad", seed: int = 0,
               targets: list[str] | None = None, net: nn.Module | None = None) -> mola.MoLAModel:
    torch.manual_seed(seed)
    cfg = mola.MoLAConfig(mode=mode, num_experts=E, rank=2, layout=layout, target_modules=targets or TARGETS)
    model = mola.inject(net if net is not None else SmallNet(), cfg).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.mola_layers().values():
            # B = 0 at init would make every adapter a no-op; scale so the adapters move outputs by O(1)
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=gen, dtype=dtype))
    return model


def set_compute(model: mola.MoLAModel, compute: str) -> None:
    for layer in model.mola_layers().values():
        layer.compute = compute


def inputs(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(IDS), 3, 9, 7, generator=gen, dtype=dtype)
    w = torch.randn(len(IDS), E, generator=gen, dtype=dtype).softmax(-1)
    return x, torch.tensor(IDS), w


def run(model: mola.MoLAModel, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, route: str) -> torch.Tensor:
    return model(x, task_ids=ids) if route == "ids" else model(x, weights=w)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


PATHS = [(layout, route) for layout in LAYOUTS for route in ("ids", "dense")]
PATH_IDS = [f"{lay}-{r}" for lay, r in PATHS]


# -- (a) fast paths == per-sample reference in float64 ------------------------------------------------
@pytest.mark.parametrize("layout,route", PATHS, ids=PATH_IDS)
def test_fast_path_equals_reference_float64(layout, route):
    model = make_model(layout)
    x, ids, w = inputs()
    out = {}
    g = {}
    for compute in ("auto", "reference"):
        set_compute(model, compute)
        model.zero_grad(set_to_none=True)
        y = run(model, x, ids, w, route)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        out[compute], g[compute] = y.detach(), grads(model)
    torch.testing.assert_close(out["auto"], out["reference"], rtol=0, atol=1e-10)
    assert g["auto"].keys() == g["reference"].keys()
    for name in g["auto"]:
        torch.testing.assert_close(g["auto"][name], g["reference"][name], rtol=0, atol=1e-10, msg=name)
    # the adapters change the output, so the comparison is not vacuous
    with torch.no_grad():
        plain = model(x, weights=torch.zeros_like(w))
    assert (out["auto"] - plain).abs().max() > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_router_model_fast_equals_reference_float64(layout):
    model = make_model(layout, mode="router")
    x, ids, _ = inputs()
    set_compute(model, "auto")
    fast = model(x, task_ids=ids)
    set_compute(model, "reference")
    ref = model(x, task_ids=ids)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)


# -- (b) bf16 autocast -------------------------------------------------------------------------------
@pytest.mark.parametrize("compute", ["auto", "reference"])
@pytest.mark.parametrize("layout,route", PATHS, ids=PATH_IDS)
def test_bf16_autocast_close_to_fp32(layout, route, compute):
    model = make_model(layout, dtype=torch.float32)
    set_compute(model, compute)
    x, ids, w = inputs(torch.float32)
    with torch.no_grad():
        ref = run(model, x, ids, w, route)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = run(model, x, ids, w, route)
    assert low.dtype == torch.bfloat16  # the head Linear runs in bf16 under autocast
    assert torch.isfinite(low).all()
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 3e-2, f"relative error {rel:.3e}"


def test_bf16_autocast_backward_runs():
    for layout, route in PATHS:
        model = make_model(layout, dtype=torch.float32)
        x, ids, w = inputs(torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run(model, x, ids, w, route)
        y.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- (c) channels_last ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_cl", [False, True], ids=["nchw_model", "cl_model"])
@pytest.mark.parametrize("layout,route", PATHS, ids=PATH_IDS)
def test_channels_last_equals_nchw_float64(layout, route, model_cl):
    model = make_model(layout)
    x, ids, w = inputs()
    ref = run(model, x, ids, w, route)
    if model_cl:
        to_channels_last(model)
        assert model.model.conv1.base_layer.weight.is_contiguous(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and not x_cl.is_contiguous()
    out = run(model, x_cl, ids, w, route)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def to_channels_last(model: nn.Module) -> None:
    # plain Module.to: every 4-D tensor, the factorized lora_A (E*r, Ci, kh, kw) included, goes channels_last
    model.to(memory_format=torch.channels_last)


# -- (d) torch.compile ---------------------------------------------------------------------------------
class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


def two_conv(layout: str = "factorized") -> mola.MoLAModel:
    return make_model(layout, dtype=torch.float32, targets=["conv1", "conv2"], net=TwoConv())


def _compile_unsupported_reason() -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile is not available"
    try:
        import torch._dynamo as dynamo
    except Exception as err:  # pragma: no cover - depends on the build
        return f"torch._dynamo cannot be imported: {err}"
    if hasattr(dynamo, "is_dynamo_supported") and not dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python/platform"
    return None


def _call_compiled(fn, *args, **kwargs):
    """Run a compiled callable; skip (not fail) when the platform cannot compile (no C++ compiler, ...)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        from torch._dynamo.exc import BackendCompilerFailed

        text = f"{type(err).__name__}: {err}".lower()
        no_toolchain = any(k in text for k in ("c++ compiler", "invalidcxxcompiler", "no working c compiler",
                                               "cpp compile error", "compiler not found"))
        if isinstance(err, BackendCompilerFailed) and no_toolchain:
            pytest.skip(f"torch.compile backend unavailable here: {str(err).splitlines()[0][:200]}")
        raise


requires_compile = pytest.mark.skipif(_compile_unsupported_reason() is not None,
                                      reason=_compile_unsupported_reason() or "")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@requires_compile
def test_compile_dense_path_fullgraph_equals_eager(fresh_dynamo):
    model = two_conv()
    x, _, w = inputs(torch.float32)
    w = w.clone().requires_grad_(True)
    y_eager = model(x, weights=w)
    y_eager.square().sum().backward()
    g_eager, gw_eager = grads(model), w.grad.clone()
    model.zero_grad(set_to_none=True)
    w.grad = None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # the traced forward+backward graphs
    y = _call_compiled(compiled, x, weights=w)
    y.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, gw_eager, rtol=1e-4, atol=1e-4)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, g_eager[name], rtol=1e-4, atol=1e-4, msg=name)


@requires_compile
def test_compile_task_id_path_equals_eager(fresh_dynamo):
    # The task-id path graph-breaks (host reads of the task counts), so it compiles without fullgraph.
    model = two_conv()
    x, ids, _ = inputs(torch.float32)
    with torch.no_grad():
        ref = model(x, task_ids=ids)
        compiled = torch.compile(model, backend="aot_eager")
        out = _call_compiled(compiled, x, task_ids=ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _explain(fn, *args, **kwargs):
    ex = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = []
    for br in ex.break_reasons:
        where = br.user_stack[-1] if br.user_stack else None
        loc = f"{Path(where.filename).name}:{where.lineno} ({where.name})" if where is not None else "?"
        reasons.append(f"{loc}: {br.reason.strip().splitlines()[0]}")
    return ex, reasons


@requires_compile
def test_dynamo_explain_graph_breaks(fresh_dynamo):
    """Dense path: no graph break (fullgraph works). Task-id path: print the breaks that remain."""
    model = two_conv()
    layer: MoLALayer = model.mola_layers()["conv1"]
    x, ids, w = inputs(torch.float32)
    model.routing.set_weights(w)
    ex, reasons = _explain(layer, x)
    assert ex.graph_break_count == 0, reasons
    torch._dynamo.reset()
    model.routing.set_task_ids(ids)
    ex, reasons = _explain(layer, x)
    print(f"\nMoLA layer, task-id path: {ex.graph_count} graphs, {ex.graph_break_count} graph breaks")
    for r in reasons:
        print("  break:", r)
    torch._dynamo.reset()
    ex, reasons = _explain(model, x, task_ids=ids)
    print(f"MoLAModel(x, task_ids), 2 MoLA convs: {ex.graph_count} graphs, {ex.graph_break_count} graph breaks")
    for r in reasons:
        print("  break:", r)


@requires_compile
@pytest.mark.parametrize("layout", LAYOUTS)
def test_task_id_lowrank_path_has_no_graph_break(fresh_dynamo, layout):
    """Task ids through the one-hot low-rank path: no host sync, so the layer and the model trace whole."""
    model = two_conv(layout)
    set_compute(model, "lowrank")
    x, ids, _ = inputs(torch.float32)
    model.routing.set_task_ids(ids)
    ex, reasons = _explain(model.mola_layers()["conv1"], x)
    assert ex.graph_break_count == 0, reasons
    torch._dynamo.reset()
    ex, reasons = _explain(model, x, task_ids=ids)
    assert ex.graph_break_count == 0, reasons
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x, task_ids=ids)
        out = torch.compile(model, fullgraph=True, backend="eager")(x, task_ids=ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@requires_compile
def test_router_forward_and_twd_have_no_graph_break(fresh_dynamo):
    """Router mode: router, softmax, lift, dense MoLA layers and the TwD loss trace as one graph."""
    model = make_model("factorized", dtype=torch.float32, mode="router", targets=["conv1", "conv2"], net=TwoConv())
    x, ids, _ = inputs(torch.float32)

    def loss(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return model(x, task_ids=ids).square().mean() + 0.1 * model.twd_loss()

    ex, reasons = _explain(loss, x, ids)
    assert ex.graph_break_count == 0, reasons
    for no_pair in (False, True):  # all tasks distinct: TwD is a zero, still without a host sync
        ids_ = torch.arange(len(IDS)) if no_pair else ids
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(loss, fullgraph=True, backend="eager")(x, ids_), loss(x, ids_),
                                   rtol=1e-5, atol=1e-5)


@requires_compile
def test_compile_task_id_path_recompiles_per_count_pattern(fresh_dynamo):
    """Correct for every task mix; a new per-task count vector recompiles at most one graph per MoLA layer, and a
    mix seen before recompiles nothing."""
    model = two_conv()
    x, _, _ = inputs(torch.float32)
    captured = []

    def counting_backend(gm, example_inputs):
        captured.append(len(gm.graph.nodes))
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend)
    # five different per-task count vectors (all tasks, absent tasks, a single task)
    patterns = [IDS, [0, 0, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1, 1], [3, 0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 3, 3, 1]]
    counts_after = []
    with torch.no_grad():
        for p in patterns:
            ids = torch.tensor(p)
            torch.testing.assert_close(compiled(x, task_ids=ids), model(x, task_ids=ids), rtol=1e-5, atol=1e-5)
            counts_after.append(len(captured))
        print(f"\ngraphs captured after each of {len(patterns)} task mixes: {counts_after}")
        # a new count vector recompiles at most the graph after each MoLA layer's host read of the counts
        new_per_mix = [b - a for a, b in zip(counts_after, counts_after[1:], strict=False)]
        assert counts_after[0] > 0 and all(0 <= n <= len(model.mola_layers()) for n in new_per_mix), counts_after
        for p in patterns:  # the same mixes again: every graph is reused, nothing recompiles
            ids = torch.tensor(p)
            torch.testing.assert_close(compiled(x, task_ids=ids), model(x, task_ids=ids), rtol=1e-5, atol=1e-5)
        assert len(captured) == counts_after[-1], (counts_after, len(captured))


# -- (e) the benchmark scripts' smoke runs ------------------------------------------------------------
@pytest.mark.slow
def test_benchmark_smoke_runs():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    scripts = {"bench_mola.py": "| variant", "bench_scaling.py": "| T = E"}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / name), "--smoke"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in scripts}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, f"{name} --smoke failed:\n{err[-3000:]}"
        assert scripts[name] in out and "ms/" in out, f"{name}: no table header in\n{out}"
        assert "x plain" in out
