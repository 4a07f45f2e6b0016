"""Registry of on-disk layouts / scenario builders: ``data.kind`` -> builder(DataConfig) -> Scenario."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mola.data.config import DataConfig
from mola.registry import Registry
from mola.tasks import Scenario

SCENARIOS: Registry[Callable[[DataConfig], Scenario]] = Registry("data kind")


def build_scenario(cfg: DataConfig) -> Scenario:
    """Build the scenario named by ``cfg.kind`` (imports the built-in layouts on first use) and validate it."""
    import mola.data.layouts  # noqa: F401  (registers the built-in layouts)
    from mola.data.validate import validate_scenario

    builder = SCENARIOS.get(cfg.kind)
    try:
        scenario = builder(cfg)
    except FileNotFoundError as err:
        if Path(cfg.root).expanduser().exists():
            raise
        raise FileNotFoundError(f"{err}\n{missing_root_hint(cfg.kind)}") from err
    return validate_scenario(scenario)


def missing_root_hint(kind: str) -> str:
    """Where the shipped data is expected and how to point at other data (for a data.root that is missing)."""
    from mola.data.synthetic import SPECS

    repo = Path(__file__).resolve().parents[3]
    shipped = repo.parent / "shared" / "data" if (repo / "configs").is_dir() else None
    where = (f"the shipped datasets are expected in {shipped} (the folder shared/data next to the mola checkout)"
             if shipped else "the shipped datasets are expected in shared/data next to a mola checkout")
    text = (f"{where}; for other data pass data.root=PATH on the command line (or data.kind=tasks "
            "data.root=PATH for your own images: docs/data.md)")
    if kind in SPECS.names():
        text += f"; `mola train --dry-run --synthetic` checks a {kind} config without its data"
    return text
