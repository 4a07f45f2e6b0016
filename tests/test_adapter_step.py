"""benchmarks/adapter_step.py: the adapters' step next to W0 grows with s^2 = (alpha / r)^2 (docs/results.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("adapter_step", ROOT / "benchmarks" / "adapter_step.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_adapter_step_grows_with_the_square_of_the_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    if not (ROOT.parent / "shared" / "data" / "medmnist").is_dir():
        pytest.skip("shipped data not found")
    monkeypatch.chdir(ROOT)
    bench = _bench()
    extra = ["data.tasks=[breast,retina]", "data.max_per_task=64", "data.max_eval_per_task=16", "data.batch_size=32"]
    small, large = (bench.measure("configs/manytask.yaml", a, 0.02, 3, 0, list(extra)) for a in (4.0, 16.0))
    assert small["s"] == 1.0 and large["s"] == 4.0
    # W0's own step barely depends on alpha; the adapters' step is about (16/4)^2 = 16x larger (B starts at 0)
    assert large["dW0"] == pytest.approx(small["dW0"], rel=0.3)
    assert 8.0 < large["dAdapter"] / small["dAdapter"] < 32.0
