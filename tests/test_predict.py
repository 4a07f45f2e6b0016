"""Task centroids of the router code z, task inference and ``mola predict`` (CSV), against hand computations."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_runs import make_data, train_tiny_run, write_test_pngs
from mola.analysis.routing import task_inference_accuracy as analysis_accuracy
from mola.cli.main import main
from mola.cli.predict import COLUMNS
from mola.engine.run import load_run
from mola.task_inference import TaskCentroids, fit_centroids, fit_sigma2, posterior_nll


# -- centroids and confidence on synthetic codes ------------------------------------------------------------
def synthetic_codes(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n) % 3
    centres = np.eye(3, 4) * 2.0
    return centres[t] + 0.6 * rng.standard_normal((n, 4)), t


def test_fit_centroids_matches_hand_formulas() -> None:
    z, t = synthetic_codes()
    c = fit_centroids(z, t, ["a", "b", "c"])
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    hand = np.stack([u[t == k].mean(0) for k in range(3)])
    np.testing.assert_allclose(c.centroids, hand, atol=1e-12)
    # no validation codes: sigma^2 = mean squared distance to the own centroid / d
    np.testing.assert_allclose(c.sigma2, np.mean(((u - hand[t]) ** 2).sum(1)) / 4, rtol=1e-12)
    assert c.meta["sigma2_fit"] == "train" and c.counts == [20, 20, 20]
    zq = np.random.default_rng(1).standard_normal((7, 4))
    uq = zq / np.linalg.norm(zq, axis=1, keepdims=True)
    d2 = ((uq[:, None] - hand[None]) ** 2).sum(-1)
    p = np.exp(-d2 / (2 * c.sigma2))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(c.posterior(zq), p, atol=1e-12)
    idx, conf = c.infer(torch.from_numpy(zq))
    assert (idx == d2.argmin(1)).all()
    np.testing.assert_allclose(conf, p.max(1), atol=1e-12)
    assert (conf >= 1 / 3 - 1e-12).all() and (conf <= 1).all()


def test_sigma2_fitted_on_validation_minimises_nll() -> None:
    z, t = synthetic_codes()
    zv, tv = synthetic_codes(seed=5)
    c = fit_centroids(z, t, ["a", "b", "c"], val_codes=zv, val_task_ids=tv)
    assert c.meta["sigma2_fit"] == "val"
    d2 = c.sq_distances(zv)
    grid = np.exp(np.linspace(math.log(1e-4), math.log(10), 400))
    best = grid[np.argmin([posterior_nll(s, d2, tv) for s in grid])]
    assert posterior_nll(c.sigma2, d2, tv) <= posterior_nll(best, d2, tv) + 1e-6
    assert fit_sigma2(d2, tv) == pytest.approx(c.sigma2)


def test_accuracy_agrees_with_analysis_routing_and_roundtrip(tmp_path: Path) -> None:
    z, t = synthetic_codes()
    zt, tt = synthetic_codes(seed=9)
    c = fit_centroids(z, t, ["a", "b", "c"], {"checkpoint": "best"})
    mine = float((c.infer(zt)[0] == tt).mean())
    assert mine == pytest.approx(analysis_accuracy(z, t, zt, tt, 3))
    loaded = TaskCentroids.load(c.save(tmp_path / "c.json"))
    np.testing.assert_allclose(loaded.centroids, c.centroids)
    assert loaded.sigma2 == c.sigma2 and loaded.tasks == ["a", "b", "c"] and loaded.meta["checkpoint"] == "best"
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a mola task-centroids file"):
        TaskCentroids.load(tmp_path / "bad.json")


def test_single_input_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="single-input"):
        fit_centroids(np.ones((4, 2)), np.full(4, -1), ["a"])


# -- a trained tiny router run --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def router_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("predict"), "mola_router")


@pytest.fixture(scope="module")
def images(router_run: Path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = router_run.parent / "images"
    return folder, write_test_pngs(router_run.parent / "data", folder)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def test_training_stores_centroids(router_run: Path) -> None:
    data = json.loads((router_run / "task_centroids.json").read_text())
    assert data["format"] == "mola-task-centroids" and data["tasks"] == ["bright", "dark"]
    assert data["counts"] == [48, 48] and data["sigma2_fit"] == "val" and data["checkpoint"] == "best"
    assert len(data["centroids"]) == 2 and len(data["centroids"][0]) == 32


def test_predict_router_infers_task(router_run: Path, images: tuple[Path, dict[str, np.ndarray]],
                                    tmp_path: Path) -> None:
    folder, written = images
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(router_run), "--images", str(folder), "--out", str(out)]) == 0
    rows = read_rows(out)
    assert [r["path"] for r in rows] == sorted(f"{n}_{i}.png" for n in written for i in range(3))
    # hand reference: MedMNIST preprocessing, router code, nearest stored centroid, the task's head
    model = load_run(router_run).model
    cents = json.loads((router_run / "task_centroids.json").read_text())
    c, s2 = np.array(cents["centroids"]), cents["sigma2"]
    imgs = np.concatenate([written[n] for n in sorted(written)])
    x = (torch.from_numpy(imgs).float().unsqueeze(1) / 255 - 0.5) / 0.5
    with torch.no_grad():
        model.encoder.set_routing(x)
        z = model.encoder.routing.z.double().numpy()
        u = z / np.linalg.norm(z, axis=1, keepdims=True)
        d2 = ((u[:, None] - c[None]) ** 2).sum(-1)
        post = np.exp(-d2 / (2 * s2) - (-d2 / (2 * s2)).max(1, keepdims=True))
        post /= post.sum(1, keepdims=True)
        ids = torch.from_numpy(d2.argmin(1))
        feats = model.encoder(x, task_ids=ids)
        for i, r in enumerate(rows):
            k = int(ids[i])
            assert r["inferred_task"] == r["task"] == ["bright", "dark"][k]
            assert float(r["confidence"]) == pytest.approx(post[i, k], abs=1e-5)
            prob = torch.softmax(model.head(k)(feats[i:i + 1]), -1)[0]
            assert int(r["class_index"]) == int(prob.argmax()) and r["class_name"] == str(int(prob.argmax()))
            assert float(r["probability"]) == pytest.approx(float(prob.max()), abs=1e-5)
            assert len(r["top_k"].split(";")) == min(3, prob.numel())


def test_predict_with_task_and_errors(router_run: Path, images: tuple[Path, dict[str, np.ndarray]],
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = images
    out = tmp_path / "p.csv"
    base = ["predict", "--checkpoint", str(router_run), "--out", str(out)]
    assert main([*base, "--images", str(folder), "--task", "dark"]) == 0
    rows = read_rows(out)
    assert {r["task"] for r in rows} == {"dark"} and all(r["inferred_task"] in ("bright", "dark") for r in rows)
    assert main([*base, "--images", str(folder), "--task", "medium"]) == 2
    assert "unknown task 'medium'; valid tasks: bright, dark" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main([*base, "--images", str(empty)]) == 2
    assert "holds no image file" in capsys.readouterr().err
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    Image.new("RGBA", (28, 28), (10, 20, 30, 128)).save(rgba / "a.png")  # read as training reads it: alpha dropped
    assert main([*base, "--images", str(rgba)]) == 0
    assert [r["path"] for r in read_rows(out)] == ["a.png"]
    (rgba / "b.png").write_bytes(b"not a png")
    assert main([*base, "--images", str(rgba)]) == 2
    assert "b.png" in capsys.readouterr().err


def test_predict_without_centroids_says_how_to_compute(router_run: Path, images: tuple[Path, dict[str, np.ndarray]],
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = images
    old = tmp_path / "old-run"
    shutil.copytree(router_run, old)
    (old / "task_centroids.json").unlink()
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(old), "--images", str(folder), "--out", str(out)]) == 2
    assert "--compute-centroids" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(old), "--images", str(folder), "--out", str(out),
                 "--compute-centroids"]) == 0
    again = json.loads((old / "task_centroids.json").read_text())
    stored = json.loads((router_run / "task_centroids.json").read_text())
    np.testing.assert_allclose(again["centroids"], stored["centroids"], atol=1e-6)  # same model, same codes
    assert len(read_rows(out)) == 6


def test_grad_run_needs_task(tmp_path: Path, images: tuple[Path, dict[str, np.ndarray]],
                             capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = images
    run = train_tiny_run(tmp_path, "mola_grad")
    assert not (run / "task_centroids.json").exists()
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(run), "--images", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs --task" in err and "bright, dark" in err
    assert main(["predict", "--checkpoint", str(run), "--images", str(folder), "--out", str(out), "--task", "1"]) == 0
    rows = read_rows(out)
    assert {r["task"] for r in rows} == {"dark"} and {r["inferred_task"] for r in rows} == {""}


@pytest.mark.parametrize(("kind", "channels", "augment"), [("folder", 3, ""), ("folder", 1, ""),
                                                             ("radimagenet", 3, ""), ("folder", 3, "paper")])
def test_layout_preprocessing_matches_the_training_pipeline(tmp_path: Path, kind: str, channels: int,
                                                            augment: str) -> None:
    """An image layout's declared single-image preprocessing (used by predict) gives the tensor training read
    (``data.augment: paper``: resize and centre crop, as vlcs/office_home evaluate)."""
    from fixtures_data import make_image_tree
    from mola.data import DataConfig, build_scenario

    groups = {"d0": {"a": 4, "b": 4}, "d1": {"a": 4, "b": 4}}
    make_image_tree(tmp_path / "data", groups)
    sc = build_scenario(DataConfig(kind=kind, root=str(tmp_path / "data"), image_size=12, channels=channels,
                                   augment=augment or False))
    assert sc.preprocessing is not None and sc.preprocessing.channels == channels
    for i in range(len(sc.val)):
        torch.testing.assert_close(sc.preprocessing.load(Path(sc.val.paths[i])), sc.val[i][0], atol=1e-6, rtol=0)


def test_array_layouts_declare_their_preprocessing(tmp_path: Path) -> None:
    from mola.data import DataConfig, build_scenario

    sc = build_scenario(DataConfig(kind="medmnist", root=str(make_data(tmp_path / "data")), channels=1))
    assert sc.preprocessing is not None and sc.preprocessing.mean == (0.5,) and sc.preprocessing.size == (28, 28)


def _write_variant(path: Path, rng: np.random.Generator, variant: str) -> None:
    """A 20x16 PNG: "rgba" (random RGB, random alpha) or "gray16" (random 16-bit gray)."""
    if variant == "rgba":
        Image.fromarray(rng.integers(0, 256, (16, 20, 4), dtype=np.uint8), "RGBA").save(path)
    else:
        Image.fromarray(rng.integers(0, 65536, (16, 20), dtype=np.uint16)).save(path)


@pytest.mark.parametrize(("variant", "channels"), [("rgba", 3), ("gray16", 1), ("gray16", 3)])
def test_folder_layout_pixel_parity_on_rgba_and_16bit_pngs(tmp_path: Path, variant: str, channels: int) -> None:
    """RGBA and 16-bit PNGs: training's dataset item, the layout's declared preprocessing (eval, predict) and an
    independent torchvision reference on the 8-bit image (alpha dropped; 16-bit / 257 rounded) give one tensor."""
    from torchvision import transforms as T

    from mola.data import DataConfig, build_scenario
    from mola.data.transforms import normalize_stats

    rng = np.random.default_rng(0)
    for d in ("d0", "d1"):
        for c in ("a", "b"):
            (tmp_path / "data" / d / c).mkdir(parents=True)
            for i in range(4):
                _write_variant(tmp_path / "data" / d / c / f"{i}.png", rng, variant)
    sc = build_scenario(DataConfig(kind="folder", root=str(tmp_path / "data"), image_size=12, channels=channels))
    ref = T.Compose([T.Resize((12, 12)), T.ToTensor(), T.Normalize(*normalize_stats(channels))])
    for i in range(len(sc.val)):
        path = Path(sc.val.paths[i])
        with Image.open(path) as im:
            a = np.asarray(im)
        if variant == "rgba":
            eight = Image.fromarray(a[..., :3], "RGB")
        else:
            eight = Image.fromarray(np.rint(a / 257.0).astype(np.uint8), "L")
        eight = eight.convert("RGB" if channels == 3 else "L")
        want = ref(eight)
        assert sc.preprocessing.load(path).shape == (channels, 12, 12)
        torch.testing.assert_close(sc.preprocessing.load(path), want, atol=0, rtol=0)
        torch.testing.assert_close(sc.val[i][0], want, atol=0, rtol=0)


@pytest.mark.parametrize(("size", "bits"), [(28, 8), (16, 8), (16, 16)])
def test_medmnist_pixel_parity_with_png_files(tmp_path: Path, size: int, bits: int) -> None:
    """An array layout (MedMNIST): each test image written as an 8- or 16-bit PNG and read by the declared
    preprocessing (predict) equals the tensor training built from the npz array (resized to ``size``)."""
    from fixtures_data import make_npz
    from mola.data import DataConfig, build_scenario

    npz = make_npz(tmp_path / "med" / "bloodmnist.npz", (6, 4, 5), 8)
    images = np.load(npz)["test_images"]
    sc = build_scenario(DataConfig(kind="medmnist", root=str(tmp_path / "med"), image_size=size, channels=1))
    assert len(sc.test) == len(images)
    for i, a in enumerate(images):
        png = tmp_path / f"{i}.png"
        Image.fromarray(a.astype(np.uint16) * 257 if bits == 16 else a).save(png)
        torch.testing.assert_close(sc.preprocessing.load(png), sc.test[i][0], atol=1e-6, rtol=0)
