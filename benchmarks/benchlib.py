"""Helpers shared by the MoLA benchmarks: device, timing, memory, training steps and the per-sample baseline.

Timing: CUDA events around each step when the device is a GPU, ``time.perf_counter`` on CPU; the median of
the timed steps is reported. Memory: ``torch.cuda.max_memory_allocated`` on a GPU; on CPU the peak resident
set size of the process (``VmHWM``, reset through ``/proc/self/clear_refs`` before each variant), minus the RSS
before the variant was built, or "n/a" where the kernel does not allow the reset. Both count everything the
variant allocates after its start: parameters, gradients, optimizer state, activations and temporaries.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.layers import MoLAConv2d, MoLALayer

MiB = 1024.0 * 1024.0


# -- environment --------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return dev


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    return f"device={device.type} ({hw}); torch {torch.__version__}; python {platform.python_version()}"


def amp_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown --dtype {dtype!r}; expected fp32 or bf16")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- memory ---------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _release_cpu_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS starts low


class MemoryMeter:
    """Peak memory a variant adds between ``start`` and ``peak_bytes`` (None where it cannot be measured)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base: int | None = None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        _release_cpu_memory()
        self.base = None
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        except OSError:
            return
        rss = _proc_status_kib("VmRSS")
        self.base = rss * 1024 if rss is not None else None

    def peak_bytes(self) -> int | None:
        if self.base is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        hwm = _proc_status_kib("VmHWM")
        return None if hwm is None else max(hwm * 1024 - self.base, 0)


# -- timing ---------------------------------------------------------------------------------------------
def time_steps(step: Callable[[], object], device: torch.device, steps: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        events = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


@dataclass
class Result:
    name: str
    ms: float
    mem: int | None
    note: str = ""


@dataclass
class Variant:
    """A row to measure: ``build`` makes the model, optimizer and data and returns one step callable."""

    name: str
    build: Callable[[], Callable[[], object]]
    note: str = ""


def run_variants(variants: list[Variant], device: torch.device, steps: int, warmup: int,
                 log: Callable[[str], None] | None = None, memory: bool = True) -> list[Result]:
    """Measure every variant: memory while it is built and warmed up, then time all of them round-robin.

    Phase 1 builds each variant in turn with the memory meter running and runs its ``warmup`` steps (at least
    one when ``memory``, so the peak includes a full step). Phase 2 times ``steps`` steps per variant, one step
    of each variant per round, so that load from other processes (shared CPUs, clocks) hits every row alike.
    """
    if memory:
        warmup = max(warmup, 1)
    meter = MemoryMeter(device)
    if memory and variants:
        # One untimed, unmetered step of the first variant first: one-time costs of the process (allocator
        # arenas, thread pools, kernel/primitive caches, lazy imports) would otherwise count against row 1.
        prime = variants[0].build()
        prime()
        sync(device)
        del prime
    built: list[tuple[Callable[[], object], int | None]] = []
    for v in variants:
        if memory:
            meter.start()
        step = v.build()
        for _ in range(warmup):
            step()
        sync(device)
        built.append((step, meter.peak_bytes() if memory else None))
        if log:
            log(f"built + warmed up {v.name}")
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(steps):
        for i, (step, _mem) in enumerate(built):
            times[i] += time_steps(step, device, 1, 0)
    results = [Result(v.name, statistics.median(t), mem, v.note)
               for v, t, (_s, mem) in zip(variants, times, built, strict=True)]
    if log:
        for r in results:
            log(f"{r.name}: {r.ms:.1f} ms/step")
    built.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# -- training steps -------------------------------------------------------------------------------------
def train_step(forward: Callable[[], Tensor], target: Tensor, params: list[nn.Parameter], device: torch.device,
               dtype: str, extra_loss: Callable[[], Tensor] | None = None) -> Callable[[], float]:
    """Forward + cross-entropy (+ extra loss) + backward + SGD (momentum 0.9) step, as one callable."""
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with amp_context(device, dtype):
            out = forward()
            loss = F.cross_entropy(out.float(), target)
            if extra_loss is not None:
                loss = loss + extra_loss()
        loss.backward()
        opt.step()
        return 0.0

    return step


def eval_step(forward: Callable[[], Tensor], device: torch.device, dtype: str) -> Callable[[], Tensor]:
    """One inference forward (no autograd graph)."""

    def step() -> Tensor:
        with torch.inference_mode(), amp_context(device, dtype):
            return forward()

    return step


def mixed_task_ids(batch: int, tasks: int, device: torch.device, seed: int = 0) -> Tensor:
    """Balanced task ids (every task present when batch >= tasks), in a shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(batch) % tasks
    return ids[torch.randperm(batch, generator=gen)].to(device)


def images(batch: int, size: int, device: torch.device, channels_last: bool, seed: int = 0,
           classes: int = 10) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return x, y


def to_channels_last(model: nn.Module) -> nn.Module:
    """channels_last for every 4-D parameter and buffer, in place.

    Same result as ``model.to(memory_format=torch.channels_last)`` (every MoLA tensor is at most 4-D; the
    factorized ``lora_A`` is (E*r, Ci, kh, kw)), kept as a function so the benchmarks read the same on any model.
    """
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


def prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = to_channels_last(model)
    return model


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """B = 0 at init makes a fresh adapter a no-op; give B small random values so every path does real work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoLALayer):
                b = m.lora_B
                b.copy_(0.01 * torch.randn(b.shape, generator=gen, dtype=b.dtype).to(b.device))


# -- the slow baseline: the released code's maths -------------------------------------------------------
class PerSampleGroupedConv(nn.Module):
    """One weight per sample, W_b = W0 + s * sum_e w_b,e dW_e, and one grouped conv over the whole batch.

    The batch is folded into the channels, x -> (1, B*Ci, H, W), and the B per-sample kernels are stacked
    into a (B*Co, Ci/g, kh, kw) weight used with groups = B*g. This is what the paper's released code does in
    every MoLA layer; it keeps the wrapped MoLA layer (and so its parameters) and reads the same routing.
    """

    def __init__(self, layer: MoLALayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        routing = layer.routing
        if routing is None:
            raise RuntimeError("PerSampleGroupedConv: the wrapped MoLA layer has no routing")
        dw = layer.delta_weights()  # (E, *W0.shape)
        w = routing.mixing().to(dw.dtype)  # (B, E)
        wb = layer.weight.unsqueeze(0) + layer.scaling * torch.einsum("be,en->bn", w, dw.flatten(1)).view(
            w.shape[0], *layer.weight.shape
        )
        bsz = x.shape[0]
        bias = layer.bias
        if not isinstance(layer, MoLAConv2d):  # Linear: y_b = W_b x_b (+ bias)
            y = torch.einsum("b...i,boi->b...o", x, wb.to(x.dtype))
            return y if bias is None else y + bias
        conv = layer.base_layer
        if conv.padding_mode != "zeros":
            raise ValueError("PerSampleGroupedConv supports zero padding only")
        co, ci_g, kh, kw = layer.weight.shape
        g = conv.groups
        big_bias = None if bias is None else bias.repeat(bsz)
        y = F.conv2d(x.reshape(1, bsz * ci_g * g, *x.shape[2:]), wb.reshape(bsz * co, ci_g, kh, kw), big_bias,
                     conv.stride, conv.padding, conv.dilation, bsz * g)
        return y.view(bsz, co, *y.shape[2:])


def swap_in_baseline(mola_model: nn.Module) -> int:
    """Replace every MoLA layer of a MoLAModel by the per-sample grouped-conv baseline; returns the count."""
    root = mola_model.model
    names = list(mola_model.layer_names)
    for name in names:
        layer = root.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, PerSampleGroupedConv(layer))
    return len(names)


# -- output ---------------------------------------------------------------------------------------------
HEADER = ("variant", "ms/step (median)", "x plain", "peak mem (MiB)", "x plain", "note")


def fmt_mem(mem: int | None) -> str:
    return "n/a" if mem is None else f"{mem / MiB:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "n/a"
    return f"{a / b:.2f}"


def markdown_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def result_rows(results: list[Result], plain: Result) -> list[list[str]]:
    return [[r.name, f"{r.ms:.1f}", ratio(r.ms, plain.ms), fmt_mem(r.mem), ratio(r.mem, plain.mem), r.note]
            for r in results]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
