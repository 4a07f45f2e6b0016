"""The paper's dataset presets (docs/paper.md): ``medmnist9``, ``vlcs``, ``office_home``, and the declared
shapes (``mola.data.synthetic.SPECS``) of these and of ``nyuv2`` / ``radimagenet`` for dry runs and smoke checks.

- ``medmnist9``: the nine official MedMNIST v2 files (path, oct, organc, blood, breast, derma, organa, organs,
  pneumonia ``<name>mnist.npz``) under ``data.root``; gray tiled to RGB (3 channels), resized to 224 (lazily,
  per item), mean/std 0.5, random horizontal flip on train.
- ``vlcs`` / ``office_home``: the ``folder`` layout (DomainBed folders ``root/<domain>/<class>/<image>``) with a
  check of the class count (5 / 65); pair with ``data.augment: paper`` for the paper's transforms.
"""

from __future__ import annotations

from dataclasses import replace

from torchvision import transforms as T

from mola.data.config import DataConfig
from mola.data.layouts._common import require_dir, resolve_root, tree
from mola.data.layouts.folder import build_folder
from mola.data.layouts.medmnist import KNOWN_CLASSES, build_medmnist, short_name
from mola.data.layouts.nyuv2 import NUM_SEG_CLASSES
from mola.data.layouts.nyuv2 import TASKS as NYU_TASKS
from mola.data.registry import SCENARIOS
from mola.data.synthetic import SPECS, ScenarioSpec
from mola.tasks import Scenario, TaskInfo

MEDMNIST9 = ("pathmnist", "octmnist", "organcmnist", "bloodmnist", "breastmnist", "dermamnist", "organamnist",
             "organsmnist", "pneumoniamnist")
#: official MedMNIST v2 train-split sizes (for time estimates only)
MEDMNIST9_TRAIN = {"pathmnist": 89996, "octmnist": 97477, "organcmnist": 13000, "bloodmnist": 11959,
                   "breastmnist": 546, "dermamnist": 7007, "organamnist": 34581, "organsmnist": 13940,
                   "pneumoniamnist": 4708}
MEDMNIST9_LAYOUT = tree("<root>/", "  " + "  ".join(f"{s}.npz" for s in MEDMNIST9[:5]),
                        "  " + "  ".join(f"{s}.npz" for s in MEDMNIST9[5:]),
                        "  (the official MedMNIST v2 28x28 files; keys train_images ... test_labels)")
#: domain folder names of the DomainBed downloads, classes, and total images (time estimates only)
FOLDER_PRESETS = {
    "vlcs": (("Caltech101", "LabelMe", "SUN09", "VOC2007"), 5, 10729),
    "office_home": (("Art", "Clipart", "Product", "Real World"), 65, 15588),
}


def _medmnist9_tasks(cfg: DataConfig) -> list[str]:
    if cfg.tasks is None:
        return list(MEDMNIST9)
    out = []
    for t in cfg.tasks:
        stem = t if t in MEDMNIST9 else f"{t}mnist"
        if stem not in MEDMNIST9:
            raise ValueError(f"medmnist9: unknown task {t!r}; accepted: "
                             + ", ".join(f"{s} ({short_name(s)})" for s in MEDMNIST9))
        out.append(stem)
    return out


@SCENARIOS.register("medmnist9")
def build_medmnist9(cfg: DataConfig) -> Scenario:
    """The paper's MedMNIST-9: nine official npz files, RGB, 224 px, mean/std 0.5, flip on train."""
    root = resolve_root(cfg.root)
    require_dir(root, MEDMNIST9_LAYOUT)
    stems = _medmnist9_tasks(cfg)
    missing = [f"{s}.npz" for s in stems if not (root / f"{s}.npz").is_file()]
    if missing:
        raise FileNotFoundError(f"medmnist9: {len(missing)} of the official MedMNIST files are missing in "
                                f"{str(root)!r}: {', '.join(missing)}; expected layout:\n{MEDMNIST9_LAYOUT}")
    scenario = build_medmnist(replace(cfg, kind="medmnist", tasks=stems, channels=cfg.channels or 3,
                                      image_size=cfg.image_size or 224))
    train = scenario.train
    ops = [train.transform] if getattr(train, "transform", None) is not None else []  # type: ignore[attr-defined]
    train.transform = T.Compose([*ops, T.RandomHorizontalFlip()])  # type: ignore[attr-defined]
    scenario.name = "medmnist9"
    scenario.notes += "; medmnist9 preset: random horizontal flip on train"
    return scenario


@SPECS.register("medmnist9")
def medmnist9_spec(cfg: DataConfig) -> ScenarioSpec:
    stems = _medmnist9_tasks(cfg)
    size = cfg.image_size or 224
    return ScenarioSpec("medmnist9", "multi_input",
                        [TaskInfo(short_name(s), "classification", KNOWN_CLASSES[s]) for s in stems],
                        (cfg.channels or 3, size, size), train_size=sum(MEDMNIST9_TRAIN[s] for s in stems),
                        notes="train_size: the official MedMNIST v2 train splits")


def _folder_preset(kind: str) -> None:
    domains, classes, total = FOLDER_PRESETS[kind]

    @SCENARIOS.register(kind)
    def build(cfg: DataConfig) -> Scenario:
        scenario = build_folder(cfg)
        found = len(scenario.extra["classes"])
        if found != classes:
            raise ValueError(f"{kind}: {str(cfg.root)!r} holds {found} class folders across its domains, but "
                             f"{kind} has {classes}; point data.root at the {kind} folder")
        scenario.name = kind
        return scenario

    @SPECS.register(kind)
    def spec(cfg: DataConfig) -> ScenarioSpec:
        names = list(cfg.domains or domains)
        size = cfg.image_size or 224
        share = 1.0 - cfg.val_fraction - cfg.test_fraction
        return ScenarioSpec(kind, "domain", [TaskInfo(d, "classification", classes) for d in names],
                            (cfg.channels or 3, size, size), shared_head=True,
                            train_size=round(total * share * len(names) / len(domains)),
                            notes=f"{total} images in {len(domains)} domains, {classes} classes")


_folder_preset("vlcs")
_folder_preset("office_home")


@SPECS.register("nyuv2")
def nyuv2_spec(cfg: DataConfig) -> ScenarioSpec:
    tasks = [t for t in NYU_TASKS if cfg.tasks is None or t in cfg.tasks]
    return ScenarioSpec("nyuv2", "single_input", [replace(NYU_TASKS[t]) for t in tasks], (3, 288, 384),
                        train_size=round(795 * (1 - cfg.val_fraction)),
                        notes=f"MTL-community NYUv2: 795 train images at 288x384, {NUM_SEG_CLASSES} classes")


@SPECS.register("radimagenet")
def radimagenet_spec(cfg: DataConfig) -> ScenarioSpec:
    names = list(cfg.tasks or ("task0", "task1", "task2"))
    size = cfg.image_size or 224
    return ScenarioSpec("radimagenet", "multi_input", [TaskInfo(n, "classification", 10) for n in names],
                        (cfg.channels or 3, size, size), train_size=None,
                        notes="stand-in: tasks and classes come from the folders (here 10 classes per task)")
