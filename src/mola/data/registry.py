"""Registry of on-disk layouts / scenario builders: ``data.kind`` -> builder(DataConfig) -> Scenario."""

from __future__ import annotations

from collections.abc import Callable

from mola.data.config import DataConfig
from mola.registry import Registry
from mola.tasks import Scenario

SCENARIOS: Registry[Callable[[DataConfig], Scenario]] = Registry("data kind")


def build_scenario(cfg: DataConfig) -> Scenario:
    """Build the scenario named by ``cfg.kind`` (imports the built-in layouts on first use) and validate it."""
    import mola.data.layouts  # noqa: F401  (registers the built-in layouts)
    from mola.data.validate import validate_scenario

    return validate_scenario(SCENARIOS.get(cfg.kind)(cfg))
