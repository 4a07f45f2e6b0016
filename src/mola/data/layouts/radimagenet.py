"""``radimagenet``: RadImageNet-style folders ``root/<task>/<class>/<image>`` (task = modality-anatomy).

Multi-input task heterogeneity: each task (e.g. ``CT-abdomen``, ``MR-knee``) has its own images and its own
label space (its sorted class folders), hence its own head. Images are read lazily as grayscale and turned
into ``cfg.channels`` channels (default 3, gray replicated; ImageNet statistics for 3 channels, 0.5/0.5 for
1), resized to ``cfg.image_size`` (default 224). Each task is split on its own (seeded, stratified).
"""

from __future__ import annotations

from mola.data.config import DataConfig
from mola.data.layouts._common import multi_input_scenario, resolve_root, tree
from mola.data.layouts.folder import build_file_splits, list_groups, scan_group, split_group
from mola.data.preprocess import ImagePreprocessing
from mola.data.registry import SCENARIOS
from mola.data.transforms import normalize_stats
from mola.tasks import Scenario, TaskInfo

RADIMAGENET_LAYOUT = tree(
    "<root>/",
    "  <task>/            modality-anatomy, e.g. CT-abdomen/",
    "    <class>/         e.g. normal/",
    "      <image>        .png / .jpg / ...",
)


@SCENARIOS.register("radimagenet")
def build_radimagenet(cfg: DataConfig) -> Scenario:
    """RadImageNet folder layout ``root/<task>/<class>/<image>`` -> a multi-input Scenario (head per task)."""
    root = resolve_root(cfg.root)
    tasks = list_groups(root, cfg.tasks, RADIMAGENET_LAYOUT, "task")
    files = {t: scan_group(root / t, RADIMAGENET_LAYOUT, "task") for t in tasks}
    per_task = {}
    infos = []
    for t in tasks:
        classes = sorted(files[t])
        per_task[t] = split_group(files[t], {c: i for i, c in enumerate(classes)}, cfg, t)
        infos.append(TaskInfo(t, "classification", len(classes)))
    size = cfg.image_size or 224
    channels = cfg.channels or 3
    ds = build_file_splits(tasks, per_task, cfg, size, channels, gray=True)
    return multi_input_scenario(
        "radimagenet", infos, ds, (channels, size, size),
        notes=(
            f"RadImageNet folder layout at {str(root)!r}: {len(tasks)} tasks, each with its own classes; "
            f"per-task seeded stratified split val={cfg.val_fraction} test={cfg.test_fraction} "
            f"seed={cfg.split_seed}; "
            f"grayscale -> {channels} channel(s), resized to {size}x{size}."
        ),
        extra={"classes": {t: sorted(files[t]) for t in tasks}, "root": str(root)},
        preprocessing=ImagePreprocessing.normalized((channels, size, size), *normalize_stats(channels), resize="pil",
                                                    gray=True),
    )
