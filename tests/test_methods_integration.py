"""Every registered method on an engine-like step: a tiny shared encoder + per-task heads, StepContext by hand."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.methods import (
    DOMAIN_METHODS,
    WEIGHTINGS,
    GradientMethod,
    Method,
    StepContext,
    get_domain_method,
    get_weighting,
)
from mola.methods.gradient import aligned_mtl, cagrad, graddrop, gradvac, imtl, mgda, moco, nash_mtl, pcgrad

T, D_IN, D_H, C, B = 3, 5, 6, 3, 12
F64 = torch.float64


class Tiny(nn.Module):
    """Shared Linear encoder (+ tanh) and one head per task (or one shared head for domain data)."""

    def __init__(self, shared_head: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(D_IN, D_H)
        self.heads = nn.ModuleList([nn.Linear(D_H, C) for _ in range(1 if shared_head else T)])
        self.shared_head = shared_head
        self.double()

    def forward(self, x: Tensor, ids: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        feats = torch.tanh(self.encoder(x))
        outs = {t: self.heads[0 if self.shared_head else t](feats[ids == t]) for t in sorted(set(ids.tolist()))}
        return feats, outs


def batch(absent: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D_IN, generator=g, dtype=F64)
    y = torch.randint(0, C, (B,), generator=g)
    ids = torch.arange(B) % T
    if absent is not None:
        ids[ids == absent] = (absent + 1) % T
    return x, y, ids


def step_ctx(model: Tiny, method: Method, x: Tensor, y: Tensor, ids: Tensor,
             extra: Callable[[Tiny], Tensor] | None = None) -> tuple[dict[int, Tensor], StepContext]:
    feats, outs = model(x, ids)
    targets = {t: y[ids == t] for t in outs}
    losses = {t: F.cross_entropy(o, targets[t]) for t, o in outs.items()}
    shared = list(model.encoder.parameters())
    task = list(model.heads.parameters()) + [p for p in method.parameters() if p.requires_grad]
    ctx = StepContext(model=model, shared_params=shared, task_params=task, task_ids=ids, num_tasks=T,
                      features=feats, outputs=outs, targets=targets,
                      extra_loss=None if extra is None else extra(model), epoch=0, step=0)
    return losses, ctx


def all_params(model: nn.Module, method: Method) -> list[nn.Parameter]:
    return [p for p in list(model.parameters()) + list(method.parameters()) if p.requires_grad]


def make(name: str) -> Method:
    opts = {"seed": 0} if name in ("pcgrad", "gradvac", "graddrop", "rlw") else {}
    return get_weighting(name, T, **opts)


# -- every weighting / gradient method fills finite grads -------------------------------------------------
@pytest.mark.parametrize("name", WEIGHTINGS.names())
@pytest.mark.parametrize("absent", [None, 1])
def test_weighting_fills_finite_grads(name: str, absent: int | None) -> None:
    model = Tiny()
    method = make(name).double()
    x, y, ids = batch(absent)
    losses, ctx = step_ctx(model, method, x, y, ids)
    logs = method.backward(losses, ctx)
    assert isinstance(logs, dict)
    present_heads = {id(p) for t in losses for p in model.heads[t].parameters()}
    head_ids = {id(p) for p in model.heads.parameters()}
    for p in all_params(model, method):
        if id(p) in head_ids and id(p) not in present_heads:
            assert p.grad is None or torch.all(p.grad == 0)  # an absent task's head gets nothing
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# -- gradient methods: shared grad = aggregate(G) of separately computed gradients ---------------------------
def _agg(name: str) -> tuple[Callable[[Tensor], Tensor], bool]:
    """Reference aggregate (fresh state, same seed as ``make``) and whether it works on representation grads."""
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    table: dict[str, tuple[Callable[[Tensor], Tensor], bool]] = {
        "mgda": (mgda.aggregate, False),
        "mgda_ub": (mgda.aggregate, True),
        "imtl": (imtl.aggregate, False),  # scales start at s = 0: e^0 L - 0 = L
        "nash_mtl": (nash_mtl.aggregate, False),
        "moco": (moco.aggregate, False),  # first step: Y = G, lam uniform, gamma_1 = gamma
        "aligned_mtl": (aligned_mtl.aggregate, False),
        "aligned_mtl_ub": (aligned_mtl.aggregate, True),
        "pcgrad": (lambda G: pcgrad.aggregate(G, generator=gen()), False),
        "gradvac": (lambda G: gradvac.aggregate(G, generator=gen()), False),
        "graddrop": (lambda G: graddrop.aggregate(G, generator=gen(), batch_size=B), True),
        "cagrad": (cagrad.aggregate, False),
    }
    return table[name]


GRADIENT_NAMES = [n for n in WEIGHTINGS.names() if issubclass(WEIGHTINGS.get(n), GradientMethod)]


def test_import_registers_everything() -> None:
    assert WEIGHTINGS.names() == sorted(["ew", "rlw", "dwa", "gradnorm", *GRADIENT_NAMES])
    assert set(DOMAIN_METHODS.names()) == {"erm", "dann", "mmd_aae", "selfreg", "eqrm"}


def test_gradient_method_table_is_complete() -> None:
    assert set(GRADIENT_NAMES) == {"mgda", "mgda_ub", "imtl", "nash_mtl", "moco", "aligned_mtl", "aligned_mtl_ub",
                                   "pcgrad", "gradvac", "graddrop", "cagrad"}


def _separate_reference(model: Tiny, x: Tensor, y: Tensor, ids: Tensor, name: str,
                        extra: Callable[[Tiny], Tensor] | None) -> tuple[list[Tensor], dict[int, list[Tensor]]]:
    """Expected encoder grads and per-task head grads, each task's gradient from its own fresh graph."""
    fn, rep = _agg(name)
    enc = list(model.encoder.parameters())
    rows, heads = [], {}
    for t in sorted(set(ids.tolist())):
        feats, outs = model(x, ids)
        loss = F.cross_entropy(outs[t], y[ids == t])
        wrt = [feats] if rep else enc
        gs = torch.autograd.grad(loss, wrt + list(model.heads[t].parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in gs[:len(wrt)]]))
        heads[t] = list(gs[len(wrt):])
    d = fn(torch.stack(rows))
    if rep:
        feats, _ = model(x, ids)
        expected = list(torch.autograd.grad(feats, enc, d.view_as(feats)))
    else:
        sizes = [p.numel() for p in enc]
        expected = [c.view_as(p) for c, p in zip(torch.split(d, sizes), enc, strict=True)]
    if extra is not None:
        e = torch.autograd.grad(extra(model), enc + list(model.heads.parameters()), allow_unused=True)
        e = [torch.zeros_like(p) if g is None else g for g, p in zip(e, enc + list(model.heads.parameters()),
                                                                       strict=True)]
        expected = [a + b for a, b in zip(expected, e[:len(enc)], strict=True)]
        pos = {id(p): i for i, p in enumerate(model.heads.parameters())}
        for t in heads:
            idx = [pos[id(p)] for p in model.heads[t].parameters()]
            heads[t] = [h + e[len(enc) + i] for h, i in zip(heads[t], idx, strict=True)]
    return expected, heads


@pytest.mark.parametrize("name", GRADIENT_NAMES)
@pytest.mark.parametrize("absent", [None, 0])
def test_gradient_method_matches_aggregate(name: str, absent: int | None) -> None:
    model = Tiny()
    method = make(name).double()
    x, y, ids = batch(absent)
    losses, ctx = step_ctx(model, method, x, y, ids)
    method.backward(losses, ctx)
    expected, heads = _separate_reference(model, x, y, ids, name, None)
    for p, e in zip(model.encoder.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, atol=1e-10, rtol=1e-8)
    for t, grads in heads.items():
        for p, e in zip(model.heads[t].parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", ["pcgrad", "mgda_ub", "cagrad"])
def test_gradient_method_adds_extra_loss(name: str) -> None:
    def extra(m: Tiny) -> Tensor:
        return 0.1 * m.encoder.weight.pow(2).sum() + 0.05 * m.heads[2].bias.pow(2).sum()

    model = Tiny()
    method = make(name).double()
    x, y, ids = batch()
    losses, ctx = step_ctx(model, method, x, y, ids, extra)
    method.backward(losses, ctx)
    expected, heads = _separate_reference(model, x, y, ids, name, extra)
    for p, e in zip(model.encoder.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, atol=1e-10, rtol=1e-8)
    for t, grads in heads.items():
        for p, e in zip(model.heads[t].parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, e, atol=1e-12, rtol=1e-10)


def test_single_present_task_uses_its_gradient() -> None:
    model = Tiny()
    method = make("mgda").double()
    x, y, _ = batch()
    ids = torch.zeros(B, dtype=torch.long)
    losses, ctx = step_ctx(model, method, x, y, ids)
    method.backward(losses, ctx)
    feats, outs = model(x, ids)
    ref = torch.autograd.grad(F.cross_entropy(outs[0], y), list(model.encoder.parameters()))
    for p, e in zip(model.encoder.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, e)


def test_imtl_scales_get_their_gradient() -> None:
    model = Tiny()
    method = make("imtl").double()
    x, y, ids = batch()
    losses, ctx = step_ctx(model, method, x, y, ids)
    vals = torch.stack([losses[t].detach() for t in range(T)])
    method.backward(losses, ctx)
    torch.testing.assert_close(method.log_scales.grad, vals - 1.0)  # d/ds (e^s L - s) at s = 0


# -- domain methods -------------------------------------------------------------------------------------
DOMAIN_CASES = [(n, {}) for n in DOMAIN_METHODS.names()] + [("mmd_aae", {"adv_weight": 0.5}),
                                                            ("eqrm", {"kde": False}), ("eqrm", {"burnin": 5})]


@pytest.mark.parametrize("name,opts", DOMAIN_CASES)
@pytest.mark.parametrize("absent", [None, 2])
def test_domain_method_fills_finite_grads(name: str, opts: dict, absent: int | None) -> None:
    model = Tiny(shared_head=True)
    method = get_domain_method(name, T, feature_dim=D_H, **opts).double()
    x, y, ids = batch(absent)
    losses, ctx = step_ctx(model, method, x, y, ids)
    logs = method.backward(losses, ctx)
    assert all(isinstance(v, float) for v in logs.values())
    for p in all_params(model, method):
        assert p.grad is not None and torch.isfinite(p.grad).all(), (name, p.shape)


# -- factories, options and checkpointed state -----------------------------------------------------------
def test_factories_reject_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="pcgrad"):
        get_weighting("pcgrd", T)
    with pytest.raises(ValueError, match="unknown method"):
        get_domain_method("danm", T, feature_dim=4)
    with pytest.raises(ValueError, match="unknown options"):
        get_weighting("mgda", T, normalise="l2")
    with pytest.raises(ValueError, match="normalize"):
        get_weighting("mgda", T, normalize="l3")
    with pytest.raises(ValueError, match="feature_dim"):
        get_domain_method("dann", T)


def _train_steps(method: Method, steps: int, seed: int = 0) -> Tiny:
    model = Tiny()
    method.double()
    for s in range(steps):
        x, y, ids = batch(seed=seed + s)
        losses, ctx = step_ctx(model, method, x, y, ids)
        method.backward(losses, ctx)
    return model


@pytest.mark.parametrize("name", ["moco", "gradvac", "dwa", "gradnorm"])
def test_method_state_round_trips(name: str) -> None:
    method = make(name)
    _train_steps(method, 3)
    method.on_epoch_end(0, {0: 1.0, 1: 2.0, 2: 3.0})
    method.on_epoch_end(1, {0: 0.5, 1: 2.5, 2: 3.0})
    fresh = make(name)
    fresh.load_state_dict(method.state_dict())
    for (k, a), (_, b) in zip(method.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a.to(b.dtype), b) or (torch.isnan(a).all() and torch.isnan(b).all()), k
