"""``mola predict``: classify a folder of images with a trained run and write one CSV row per image.

With ``--task`` every image goes through that task's adapter and head. Without it (MoLA-Router runs only) the
task is inferred from the router code z (nearest task centroid, ``mola.task_inference``) and the image goes
through the inferred task's head; the CSV also carries the inferred task and its confidence.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mola.data.preprocess import ImagePreprocessing

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
COLUMNS = ["path", "task", "inferred_task", "confidence", "class_index", "class_name", "probability", "top_k"]


def image_preprocessing(scenario: Any) -> ImagePreprocessing:
    """The single-image preprocessing the run's data layout declared; ValueError for non-image inputs."""
    prep = getattr(scenario, "preprocessing", None)
    if prep is None:
        raise ValueError(f"mola predict reads image files; this run's inputs ({scenario.name}, shape "
                         f"{tuple(scenario.input_shape)}) are not images its data layout can read from a file")
    return prep


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


def _task_centroids(run_dir: Path, model: Any, cfg: Any, tid: int | None, names: list[str]) -> Any:
    """The run's task centroids when the task is inferred from the image (MoLA-Router on multi-input/domain data;
    None with ``--task``); a ValueError when the run cannot infer tasks and no ``--task`` was given."""
    from mola.task_inference import is_router_multitask, load_run_centroids

    if not is_router_multitask(model):
        if tid is None:
            mode = cfg.model.mola.mode if cfg.model.arch == "mola" else f"arch {cfg.model.arch}"
            raise ValueError(f"this run ({mode}) needs --task: only MoLA-Router runs on multi-input/domain data "
                             f"can infer the task from the image; tasks: {', '.join(names)}")
        return None
    try:
        cents = load_run_centroids(run_dir)
    except FileNotFoundError:
        if tid is None:
            raise
        return None
    if cents.tasks != names:
        raise ValueError(f"{run_dir}/task_centroids.json holds tasks {cents.tasks}, the run has {names}; "
                         "recompute them with --compute-centroids")
    return cents


def _rows_of_batch(model: Any, outs: dict[int, Tensor], ids: Tensor, chunk: list[Path], root: Path, scenario: Any,
                   names: list[str], tid: int | None, inferred: Any, conf: Any, top_k: int) -> list[dict[str, Any]]:
    """The ``COLUMNS`` rows of one batch: each image's top class and top-k of its task's head."""
    logits: list[Tensor | None] = [None] * len(chunk)
    if model.single_input:
        for i in range(len(chunk)):
            logits[i] = outs[tid][i]  # type: ignore[index]  # single-input runs need --task
    else:
        for k, r in model.task_rows(ids).items():
            for j, i in enumerate(r.tolist()):
                logits[i] = outs[k][j]
    rows = []
    for i, p in enumerate(chunk):
        k = int(ids[i])
        prob = torch.softmax(logits[i].float(), dim=-1)  # type: ignore[union-attr]
        cls = _class_names(scenario, names[k], prob.numel())
        top = torch.topk(prob, min(top_k, prob.numel()))
        rows.append({
            "path": str(p.relative_to(root)), "task": names[k],
            "inferred_task": names[int(inferred[i])] if inferred is not None else "",
            "confidence": f"{float(conf[i]):.6f}" if conf is not None else "",
            "class_index": int(top.indices[0]), "class_name": cls[int(top.indices[0])],
            "probability": f"{float(top.values[0]):.6f}",
            "top_k": ";".join(f"{cls[int(c)]}:{float(v):.4f}" for v, c in zip(top.values, top.indices, strict=True)),
        })
    return rows


def predict_images(run: str | os.PathLike[str], images: str | os.PathLike[str], task: str | None = None,
                   device: str = "cpu", batch_size: int = 64, top_k: int = 3,
                   compute_centroids: bool = False, overrides: Sequence[str] = (),
                   progress: bool = False) -> list[dict[str, Any]]:
    """One row (``COLUMNS``) per image of ``images``, predicted by the best checkpoint of ``run``;
    ``overrides`` (``data.root=...``) point at the run's data if it moved since training."""
    from mola.engine.evaluate import progress_bar
    from mola.engine.run import load_run, run_dir_of
    from mola.export import resolve_task
    from mola.task_inference import compute_run_centroids

    run_dir = run_dir_of(run)
    if compute_centroids:
        print(f"wrote {compute_run_centroids(run, device, overrides)}", file=sys.stderr)
    loaded = load_run(run, "best", device, overrides=overrides)
    cfg, scenario, model = loaded.cfg, loaded.scenario, loaded.model
    names = [t.name for t in scenario.tasks]
    tid = resolve_task(task, names) if task is not None else None
    cents = _task_centroids(run_dir, model, cfg, tid, names)
    wanted = [tid] if tid is not None else list(range(len(names)))
    bad = [names[k] for k in wanted if scenario.tasks[k].kind != "classification"]
    if bad:
        raise ValueError(f"mola predict writes class predictions; task(s) {bad} are not classification tasks")
    prep = image_preprocessing(scenario)
    files = list_images(images)
    root = Path(images)
    rows: list[dict[str, Any]] = []
    enc = getattr(model, "encoder", None)
    with torch.no_grad():
        for start in progress_bar(range(0, len(files), batch_size), "predict", progress, unit="batch"):
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
            rows += _rows_of_batch(model, outs, ids, chunk, root, scenario, names, tid, inferred, conf, top_k)
    return rows


def cmd_predict(args: argparse.Namespace) -> int:
    from mola.cli.checks import check_writable_file
    from mola.engine.setup import resolve_device
    from mola.files import write_csv

    if args.top_k < 1 or args.batch_size < 1:
        bad = ("--top-k", args.top_k) if args.top_k < 1 else ("--batch-size", args.batch_size)
        raise ValueError(f"{bad[0]} must be >= 1, got {bad[1]}")
    resolve_device(args.device, "--device")
    check_writable_file(Path(args.out), "--out")
    rows = predict_images(args.checkpoint, args.images, args.task, args.device, args.batch_size, args.top_k,
                          args.compute_centroids, args.overrides, progress=True)
    out = write_csv(rows, args.out, COLUMNS)
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
    p.add_argument("overrides", nargs="*", metavar="data.root=PATH",
                   help="where the run's data is now, if it moved since training")
    p.set_defaults(func=cmd_predict)
