"""``mola predict``: classify a folder of images with a trained run and write one CSV row per image.

With ``--task`` every image goes through that task's adapter and head. Without it (MoLA-Router runs only) the
task is inferred from the router code z (nearest task centroid, ``mola.task_inference``) and the image goes
through the inferred task's head; the CSV also carries the inferred task and its confidence.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ACCEPTED_MODES = ("1", "L", "P", "RGB")
COLUMNS = ["path", "task", "inferred_task", "confidence", "class_index", "class_name", "probability", "top_k"]


@dataclass
class ImagePreprocessing:
    """How training turned an image into the model input: channels, size, scaling and mean/std.

    ``resize="pil"``: PIL bilinear resize, then [0, 1] and mean/std (image-file layouts, ``ImageFileTransform``);
    ``resize="tensor"``: [0, 1], mean/std, then bilinear resize of the tensor (array layouts such as MedMNIST).
    Gray and RGB images are converted to ``channels`` as training did (gray replicated, RGB -> luminance).
    """

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "tensor"
    gray: bool = False

    def load(self, path: Path) -> Tensor:
        """The (C, H, W) float input for one image file; ValueError naming the file on a bad image."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                mode, bands = im.mode, len(im.getbands())
                if mode not in ACCEPTED_MODES or (mode == "P" and "transparency" in im.info):
                    raise ValueError(
                        f"image {str(path)!r} has mode {mode} ({bands} channel(s)); the model expects "
                        f"{self.channels}-channel input and mola predict accepts gray or RGB images (no alpha, "
                        f"CMYK or 16-bit): convert it to {'L' if self.channels == 1 else 'RGB'} first")
                im = im.convert("L" if (self.gray or self.channels == 1) else "RGB")
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise ValueError(f"cannot read image file {str(path)!r}: {err}") from err
        return self._pipeline(im)

    def _pipeline(self, im: Any) -> Tensor:
        from torchvision.transforms import functional as TF

        from mola.data.transforms import resize_tensor, to_channels

        if self.resize == "pil":
            im = TF.resize(im, list(self.size))
        x = to_channels(TF.to_tensor(im), self.channels)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        x = (x - mean) / std
        return resize_tensor(x, self.size) if self.resize == "tensor" else x

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_preprocessing(data_kind: str, scenario: Any) -> ImagePreprocessing:
    """The preprocessing of ``scenario`` (built by data kind ``data_kind``); ValueError for non-image inputs."""
    from mola.data.transforms import normalize_stats

    shape = tuple(scenario.input_shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"mola predict reads image files; this run's inputs ({data_kind}) have shape {shape}, "
                         "not (1 or 3, H, W) images")
    c, size = shape[0], (shape[1], shape[2])
    if data_kind == "medmnist":
        return ImagePreprocessing(c, size, (0.5,) * c, (0.5,) * c)
    if data_kind == "digits":
        m, s = float(scenario.extra["mean"]), float(scenario.extra["std"])
        return ImagePreprocessing(c, size, (m,) * c, (s,) * c)
    if data_kind == "multidigit":
        from mola.data.layouts.multidigit import MNIST_MEAN, MNIST_STD

        return ImagePreprocessing(c, size, (MNIST_MEAN,) * c, (MNIST_STD,) * c)
    if data_kind in ("folder", "radimagenet"):
        mean, std = normalize_stats(c)
        return ImagePreprocessing(c, size, tuple(mean), tuple(std), resize="pil", gray=data_kind == "radimagenet")
    raise ValueError(f"mola predict does not know how data kind {data_kind!r} preprocesses images; known: "
                     "medmnist, digits, multidigit, folder, radimagenet")


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files skipped), sorted; errors for a missing/empty folder."""
    root = Path(folder)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"image folder {str(root)!r} {what}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ValueError(f"image folder {str(root)!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _class_names(scenario: Any, task: str, num_classes: int) -> list[str]:
    classes = scenario.extra.get("classes") if isinstance(scenario.extra, dict) else None
    if isinstance(classes, dict):
        classes = classes.get(task)
    if isinstance(classes, list) and len(classes) == num_classes:
        return [str(c) for c in classes]
    return [str(i) for i in range(num_classes)]


def predict_images(run: str | os.PathLike[str], images: str | os.PathLike[str], task: str | None = None,
                   device: str = "cpu", batch_size: int = 64, top_k: int = 3,
                   compute_centroids: bool = False) -> list[dict[str, Any]]:
    """One row (``COLUMNS``) per image of ``images``, predicted by the best checkpoint of ``run``."""
    from mola.export import resolve_task
    from mola.models import task_rows
    from mola.task_inference import compute_run_centroids, is_router_multitask, load_run, load_run_centroids, run_dir_of

    run_dir = run_dir_of(run)
    if compute_centroids:
        print(f"wrote {compute_run_centroids(run, device)}", file=sys.stderr)
    cfg, scenario, model = load_run(run, "best", device)
    names = [t.name for t in scenario.tasks]
    tid = resolve_task(task, names) if task is not None else None
    router = is_router_multitask(model)
    cents = None
    if router:
        try:
            cents = load_run_centroids(run_dir)
        except FileNotFoundError:
            if tid is None:
                raise
        if cents is not None and cents.tasks != names:
            raise ValueError(f"{run_dir}/task_centroids.json holds tasks {cents.tasks}, the run has {names}; "
                             "recompute them with --compute-centroids")
    elif tid is None:
        mode = cfg.model.mola.mode if cfg.model.arch == "mola" else f"arch {cfg.model.arch}"
        raise ValueError(f"this run ({mode}) needs --task: only MoLA-Router runs on multi-input/domain data can "
                         f"infer the task from the image; tasks: {', '.join(names)}")
    wanted = [tid] if tid is not None else list(range(len(names)))
    bad = [names[k] for k in wanted if scenario.tasks[k].kind != "classification"]
    if bad:
        raise ValueError(f"mola predict writes class predictions; task(s) {bad} are not classification tasks")
    prep = image_preprocessing(cfg.data.kind, scenario)
    files = list_images(images)
    root = Path(images)
    rows: list[dict[str, Any]] = []
    enc = getattr(model, "encoder", None)
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            x = torch.stack([prep.load(p) for p in chunk]).to(device)
            inferred = conf = None
            if cents is not None:
                enc.set_routing(x)
                inferred, conf = cents.infer(enc.routing_code())
            ids = torch.full((len(chunk),), tid, dtype=torch.long) if tid is not None else \
                torch.as_tensor(inferred, dtype=torch.long)
            ids = ids.to(device)
            outs = model(x, ids)
            logits: list[Tensor | None] = [None] * len(chunk)
            if model.single_input:
                for i in range(len(chunk)):
                    logits[i] = outs[tid][i]
            else:
                for k, r in task_rows(ids, len(names)).items():
                    for j, i in enumerate(r.tolist()):
                        logits[i] = outs[k][j]
            for i, p in enumerate(chunk):
                k = int(ids[i])
                prob = torch.softmax(logits[i].float(), dim=-1)
                cls = _class_names(scenario, names[k], prob.numel())
                top = torch.topk(prob, min(top_k, prob.numel()))
                rows.append({
                    "path": str(p.relative_to(root)), "task": names[k],
                    "inferred_task": names[int(inferred[i])] if inferred is not None else "",
                    "confidence": f"{float(conf[i]):.6f}" if conf is not None else "",
                    "class_index": int(top.indices[0]), "class_name": cls[int(top.indices[0])],
                    "probability": f"{float(top.values[0]):.6f}",
                    "top_k": ";".join(f"{cls[int(c)]}:{float(v):.4f}" for v, c in zip(top.values, top.indices,
                                                                                        strict=True)),
                })
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Rows to CSV (``COLUMNS``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cmd_predict(args: argparse.Namespace) -> int:
    rows = predict_images(args.checkpoint, args.images, args.task, args.device, args.batch_size, args.top_k,
                          args.compute_centroids)
    out = write_csv(rows, args.out)
    print(f"wrote {len(rows)} predictions to {out}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``mola predict``."""
    p = subparsers.add_parser(
        "predict", help="classify a folder of images with a trained run (CSV out; router runs infer the task)",
        description="Columns: " + ", ".join(COLUMNS) + ". Without --task (MoLA-Router runs) the task is the "
                    "nearest task centroid of the router code z; confidence is its posterior (docs/deployment.md).")
    p.add_argument("--checkpoint", required=True, help="run directory (its best checkpoint) or checkpoint file")
    p.add_argument("--images", required=True, help="folder of image files (searched recursively)")
    p.add_argument("--task", help="task name or index; required unless the run is a MoLA-Router run")
    p.add_argument("--out", default="predictions.csv", help="CSV file to write (default predictions.csv)")
    p.add_argument("--top-k", type=int, default=3, help="classes listed in the top_k column (default 3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compute-centroids", action="store_true",
                   help="compute and store RUN/task_centroids.json first (router runs trained before they existed)")
    p.set_defaults(func=cmd_predict)
