"""``analyze_run``: load a trained run through the engine and write spectra, parameter counts and routing
analyses (CSV/JSON + PNG) to ``RUN_DIR/analysis``. Reads checkpoints only; never trains."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mola.analysis import plots
from mola.analysis.compare import compare_spectra, plain_layer_spectra, plain_weights
from mola.analysis.params import RANKS, count_vs_rank, parameter_counts, single_task_total
from mola.analysis.routing import collect_codes, pca_2d, routing_summary, sample_loader
from mola.analysis.spectra import layer_singular_values, layer_spectra, singular_values
from mola.engine.evaluate import progress_bar
from mola.engine.run import LoadedRun, load_run
from mola.files import write_csv, write_json
from mola.inject import find_mola_model
from mola.models import build_model
from mola.tasks import Scenario


def _params_section(run: LoadedRun, ranks: tuple[int, ...]) -> dict[str, Any]:
    cfg, model, scen = run.cfg, run.model, run.scenario
    counts = parameter_counts(model)
    out: dict[str, Any] = {"arch": cfg.model.arch, "num_tasks": scen.num_tasks, "shared_head": scen.shared_head,
                           "counts": counts}
    formula = single_task_total(counts, scen.num_tasks, scen.shared_head)
    try:
        st_cfg = dataclasses.replace(cfg.model, arch="single_task_joint", options={})
        out["single_task_total"] = parameter_counts(build_model(scen, st_cfg))["total"]
        out["single_task_source"] = "built single_task arch over the same backbone and heads"
    except (ValueError, KeyError, RuntimeError) as err:
        out["single_task_total"] = formula
        out["single_task_source"] = f"T*(backbone + head) formula ({err})"
    enc = find_mola_model(model)
    if enc is not None:
        out["mode"] = enc.config.mode
        out["rank"] = cfg.model.mola.rank

        def build(r: int) -> torch.nn.Module:
            mcfg = dataclasses.replace(cfg.model.mola, rank=r)
            return build_model(scen, dataclasses.replace(cfg.model, mola=mcfg))

        out["count_vs_rank"] = count_vs_rank(build, ranks)
    return out


def analyze_run(run_dir: str | Path, checkpoint: str = "best", eps: float = 0.99, split: str = "val",
                out_dir: str | Path | None = None, device: str = "cpu", scenario: Scenario | None = None,
                ranks: tuple[int, ...] = RANKS, max_train_samples: int = 50_000,
                experts: tuple[int, int] = (0, 1), compare: tuple[str | Path, ...] = (),
                compare_scenarios: tuple[Scenario | None, ...] | None = None, overrides: Sequence[str] = (),
                progress: bool = False) -> dict[str, Any]:
    """Analyse one run directory; ``scenario`` replaces rebuilding the data from the run's config (tests),
    ``overrides`` (``data.root=...``) point at data that moved since training.

    Task centroids come from up to ``max_train_samples`` training codes (as ``mola predict``'s stored centroids):
    when a router's codes barely separate tasks, a subset's centroids can flip many decisions.
    ``compare``: other run directories (e.g. HPS without MoLA, a higher-rank MoLA run) whose matching layer
    weights are put beside this run's in compare_spectra.csv and compare_singular_values.png (Fig. 3/4)."""
    run_dir = Path(run_dir)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be one of train, val, test, got {split!r}")
    run = load_run(run_dir, checkpoint, device, overrides=overrides, scenario=scenario)
    model, ckpt, cfg = run.model, run.state, run.cfg
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "checkpoint": checkpoint, "epoch": ckpt.get("epoch"),
                               "best_epoch": ckpt.get("best_epoch"), "arch": cfg.model.arch, "files": []}

    _analyze_params(run, ranks, out, summary)
    enc = find_mola_model(model)
    summary["mode"] = enc.config.mode if enc is not None else None
    if enc is not None:
        _analyze_mola_spectra(model, eps, experts, out, summary)
    else:
        _analyze_plain_spectra(model, eps, out, summary)
    if compare:
        if enc is None:
            raise ValueError(f"--compare needs a MoLA run to compare against; {run_dir} is arch {cfg.model.arch}")
        _analyze_compare(run, checkpoint, eps, experts, compare, compare_scenarios, overrides, device, out, summary)
    if enc is not None and enc.config.mode == "router":
        _analyze_routing(run, enc, split, max_train_samples, device, progress, out, summary)
    summary["out_dir"] = str(out)
    return summary


def _analyze_params(run: LoadedRun, ranks: tuple[int, ...], out: Path, summary: dict[str, Any]) -> None:
    """params.json (parameter counts, vs rank) and its plot."""
    params = _params_section(run, ranks)
    write_json(params, out / "params.json")
    summary["files"].append("params.json")
    summary["params"] = params
    if "count_vs_rank" in params:
        plots.plot_params_vs_rank(params["count_vs_rank"], out / "params_vs_rank.png", params["single_task_total"],
                                  params["rank"] if isinstance(params["rank"], int) else None)
        summary["files"].append("params_vs_rank.png")


def _analyze_mola_spectra(model: Any, eps: float, experts: tuple[int, int], out: Path,
                          summary: dict[str, Any]) -> None:
    """spectra.csv, PC proportions and singular values of the MoLA layers (W0 and each adapter)."""
    rows = layer_spectra(model, eps)
    write_csv(rows, out / "spectra.csv")
    plots.plot_pc_proportions(rows, out / "pc_proportion.png")
    plots.plot_singular_values(layer_singular_values(model, experts), out / "singular_values.png")
    summary["files"] += ["spectra.csv", "pc_proportion.png", "singular_values.png"]
    summary["spectra"] = {
        "layers": len(rows), "eps": eps,
        "w0_pc_mean": float(np.nanmean([r["w0_pc"] for r in rows])),
        "adapter_pc_mean": float(np.nanmean([v for r in rows for k, v in r.items()
                                             if k.startswith("e") and k.endswith("_pc")])),
    }


def _analyze_plain_spectra(model: Any, eps: float, out: Path, summary: dict[str, Any]) -> None:
    """spectra.csv and singular values of a run without MoLA (its last 12 Conv/Linear layers plotted)."""
    rows = plain_layer_spectra(model, eps)
    if not rows:
        return
    write_csv(rows, out / "spectra.csv")
    ranks_by_layer = {r["layer"]: r["w_rank"] for r in rows}
    svals = {name: {"W": singular_values(w)[: max(1, ranks_by_layer[name])]}
             for name, w in list(plain_weights(model).items())[-12:]}
    plots.plot_singular_values(svals, out / "singular_values.png",
                               title="singular values per layer, no MoLA (last 12 Conv/Linear layers)")
    summary["files"] += ["spectra.csv", "singular_values.png"]
    summary["spectra"] = {"layers": len(rows), "eps": eps, "plain": True,
                          "w_pc_mean": float(np.nanmean([r["w_pc"] for r in rows]))}


def _analyze_compare(run: LoadedRun, checkpoint: str, eps: float, experts: tuple[int, int],
                     compare: tuple[str | Path, ...], compare_scenarios: tuple[Scenario | None, ...] | None,
                     overrides: Sequence[str], device: str, out: Path, summary: dict[str, Any]) -> None:
    """compare_spectra.csv and its plot: this run's layer weights beside the matching ones of other runs."""
    scens = compare_scenarios or (None,) * len(compare)
    refs = {}
    for ref_dir, ref_scen in zip(compare, scens, strict=True):
        label = Path(ref_dir).name
        if label in refs:
            raise ValueError(f"two --compare runs share the folder name {label!r}; their labels would clash")
        refs[label] = load_run(ref_dir, checkpoint, device, overrides=overrides, scenario=ref_scen).model
    crows, csvals = compare_spectra(run.model, refs, eps, experts)
    write_csv(crows, out / "compare_spectra.csv")
    plots.plot_singular_values(csvals, out / "compare_singular_values.png",
                               title=f"singular values: {Path(summary['run_dir']).name} vs " + ", ".join(refs))
    summary["files"] += ["compare_spectra.csv", "compare_singular_values.png"]
    summary["compare"] = {"runs": [str(c) for c in compare], "layers": crows}


def _analyze_routing(run: LoadedRun, enc: Any, split: str, max_train_samples: int, device: str, progress: bool,
                     out: Path, summary: dict[str, Any]) -> None:
    """routing.json (task inference from router codes) and the router weight / code plots of a Router run."""
    cfg, model, task_names = run.cfg, run.model, run.task_names
    bs = cfg.data.eval_batch_size
    train_loader = sample_loader(run.scenario.train, bs, cfg.train.seed, max_train_samples)
    train_codes = collect_codes(model, progress_bar(train_loader, "codes (train)", progress), device)
    eval_loader = sample_loader(getattr(run.scenario, split), bs, cfg.train.seed,
                                max_train_samples if split == "train" else None)
    eval_codes = collect_codes(model, progress_bar(eval_loader, f"codes ({split})", progress), device)
    routing = routing_summary(train_codes, eval_codes, len(task_names), task_names, enc.router_names)
    routing["split"] = split
    routing["twd_weight"] = enc.config.twd_weight
    proj, ratio = pca_2d(eval_codes["z"])
    routing["pca_explained_variance"] = ratio
    write_json(routing, out / "routing.json")
    summary["files"].append("routing.json")
    names = task_names if routing["per_task"] else ["all tasks"]
    tw = "with" if enc.config.twd_weight > 0 else "without"
    mw = routing["mean_weights"] if routing["per_task"] else [routing["overall_mean_weights"]]
    plots.plot_router_heatmap(mw, names, out / "router_weights.png",
                              title=f"mean router weight per task ({split}, {tw} TwD)")
    for i, rname in enumerate(routing.get("router_names", [])):  # router_sharing per_stage / per_layer
        rmw = routing["router_mean_weights"][i] if routing["per_task"] else \
            [routing["router_overall_mean_weights"][i]]
        fname = f"router_weights_{i}.png"
        plots.plot_router_heatmap(rmw, names, out / fname,
                                  title=f"router {i} ({rname}): mean weight per task ({split}, {tw} TwD)")
        summary["files"].append(fname)
    plots.plot_codes(proj, eval_codes["task_ids"], task_names, out / "router_codes.png",
                     title=f"router codes z, 2-D PCA ({split}, {tw} TwD)")
    summary["files"] += ["router_weights.png", "router_codes.png"]
    summary["routing"] = routing


def format_summary(s: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    mode = f", mode {s['mode']}" if s.get("mode") else ""
    lines = [f"analysis of {s['run_dir']} (arch {s['arch']}{mode}, {s['checkpoint']} checkpoint, "
             f"epoch {s['best_epoch'] if s['checkpoint'] == 'best' else (s['epoch'] or 0) - 1})"]
    c = s["params"]["counts"]
    parts = ", ".join(f"{k} {v:,}" for k, v in c.items() if k != "total")
    lines.append(f"parameters: total {c['total']:,} ({parts}); single-task reference "
                 f"{s['params']['single_task_total']:,}")
    if "spectra" in s and s["spectra"].get("plain"):
        sp = s["spectra"]
        lines.append(f"spectra (no MoLA): {sp['layers']} Conv/Linear layers, mean pc proportion (eps {sp['eps']}) "
                     f"{sp['w_pc_mean']:.3f}")
    elif "spectra" in s:
        sp = s["spectra"]
        lines.append(f"spectra: {sp['layers']} MoLA layers, mean pc proportion (eps {sp['eps']}) W0 "
                     f"{sp['w0_pc_mean']:.3f}, W0+adapter {sp['adapter_pc_mean']:.3f}")
    if "routing" in s:
        r = s["routing"]
        if r["per_task"]:
            lines.append(f"routing ({r['split']}): task inference from z {r['task_inference_accuracy']:.3f} "
                         f"(majority {r['chance_accuracy']:.3f}), silhouette {r['silhouette']:.3f}, "
                         f"mean weight entropy {r['mean_weight_entropy']:.3f} / {r['max_entropy']:.3f}")
        else:
            lines.append(f"routing ({r['split']}): {r['note']}")
    for row in s.get("compare", {}).get("layers", []):
        pcs = ", ".join(f"{k[:-3]} {v:.3f}" for k, v in row.items() if k.endswith(" pc"))
        lines.append(f"pc proportion {row['layer']}: {pcs}")
    lines.append(f"wrote {s['out_dir']}: " + ", ".join(s["files"]))
    return "\n".join(lines)


__all__ = ["analyze_run", "format_summary"]
