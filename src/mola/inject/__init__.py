"""peft-style MoLA for any torch model: ``MoLAConfig`` says what to wrap, ``inject`` wraps it in place and
returns a ``MoLAModel``. Split into config (settings and checks), targets (which modules) and model (wrapping)."""

from mola.inject.config import (
    ADAPTER_WARN_FACTOR,
    MAX_ADAPTER_GB,
    MoLAConfig,
    RankTooLargeError,
    adapter_budget,
    check_mola_values,
)
from mola.inject.model import MoLAModel, build_router, find_mola_model, inject, router_groups, set_submodule
from mola.inject.targets import (
    PRESETS,
    candidate_text,
    find_stage_groups,
    find_stages,
    pattern_matches,
    rank_for,
    resolve_targets,
)

__all__ = ["ADAPTER_WARN_FACTOR", "MAX_ADAPTER_GB", "PRESETS", "MoLAConfig", "MoLAModel", "RankTooLargeError",
           "adapter_budget", "build_router", "candidate_text", "check_mola_values", "find_mola_model",
           "find_stage_groups", "find_stages", "inject",
           "pattern_matches", "rank_for", "resolve_targets", "router_groups", "set_submodule"]
