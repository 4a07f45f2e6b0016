"""Analyses of trained models (docs/results.md): weight spectra, parameter counts, router codes, result tables.

Reads trained models and run directories; never trains. Figures are drawn with matplotlib's Agg canvas.
"""

from mola.analysis.params import adapter_count, count_vs_rank, parameter_counts, single_task_total
from mola.analysis.routing import collect_codes, routing_summary, silhouette, task_inference_accuracy
from mola.analysis.spectra import layer_spectra, numerical_rank, pc_proportion, singular_values

__all__ = ["adapter_count", "collect_codes", "count_vs_rank", "layer_spectra", "numerical_rank", "parameter_counts",
           "pc_proportion", "routing_summary", "silhouette", "single_task_total", "singular_values",
           "task_inference_accuracy"]
