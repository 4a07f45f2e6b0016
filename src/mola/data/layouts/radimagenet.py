"""``radimagenet``: RadImageNet-style folders ``root/<task>/[<split>/]<class>/<image>`` (task =
modality-anatomy): the ``tasks`` layout with every image read as grayscale.

Multi-input task heterogeneity: each task (e.g. ``CT-abdomen``, ``MR-knee``) has its own images and its own
label space (its sorted class folders), hence its own head. Images are read as grayscale and turned into
``cfg.channels`` channels (default 3, gray replicated; ImageNet statistics for 3 channels, 0.5/0.5 for 1),
resized to ``cfg.image_size`` (default 224). Splits as in ``tasks``: folders, or seeded stratified fractions.
"""

from __future__ import annotations

from mola.data.base import Scenario
from mola.data.config import DataConfig
from mola.data.layouts._common import tree
from mola.data.layouts.tasks import build_task_folders
from mola.data.registry import SCENARIOS

RADIMAGENET_LAYOUT = tree(
    "<root>/",
    "  <task>/              modality-anatomy, e.g. CT-abdomen/",
    "    [train|val|test/]  optional split folders (else: seeded fractions of each task)",
    "      <class>/         e.g. normal/",
    "        <image>        .png / .jpg / ...",
)


@SCENARIOS.register("radimagenet")
def build_radimagenet(cfg: DataConfig) -> Scenario:
    """RadImageNet folder layout -> a multi-input Scenario (head per task), images read as grayscale."""
    return build_task_folders(cfg, gray=True, default_size=224, name="radimagenet", layout=RADIMAGENET_LAYOUT)
