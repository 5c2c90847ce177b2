"""From per-layer correlation results to excess-correlation scores, and from scores to the
set of universal neurons."""
from __future__ import annotations

import numpy as np
import pandas as pd

from unlib.correlation import LayerResult

EXCESS_COLUMNS = ["layer", "neuron", "excess_correlation", "n_models_compared",
                  "max_corr", "mean_corr", "min_corr", "max_baseline", "mean_baseline", "min_baseline"]
PAIRWISE_COLUMNS = ["layer", "neuron", "other_model", "max_corr", "max_layer", "max_neuron", "baseline_max_corr"]


def excess_tables(results: list[LayerResult], model_names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(excess scores, pairwise correlations) for the reference model's neurons.

    excess_correlation = mean over other models of (max corr - max rotated corr, the
    latter averaged over rotation samples)."""
    excess, pairwise = [], []
    for r in sorted(results, key=lambda r: r.layer):
        d = r.max_corr.shape[1]
        baseline = r.baseline_max_corr.mean(axis=1)  # (others, neurons)
        excess.append(pd.DataFrame({
            "layer": r.layer, "neuron": np.arange(d),
            "excess_correlation": (r.max_corr - baseline).mean(axis=0),
            "n_models_compared": len(r.others),
            "max_corr": r.max_corr.max(axis=0), "mean_corr": r.max_corr.mean(axis=0),
            "min_corr": r.max_corr.min(axis=0), "max_baseline": baseline.max(axis=0),
            "mean_baseline": baseline.mean(axis=0), "min_baseline": baseline.min(axis=0)}))
        for k, m in enumerate(r.others):
            pairwise.append(pd.DataFrame({
                "layer": r.layer, "neuron": np.arange(d), "other_model": model_names[m],
                "max_corr": r.max_corr[k], "max_layer": r.max_layer[k], "max_neuron": r.max_neuron[k],
                "baseline_max_corr": baseline[k]}))
    pairwise_df = pd.concat(pairwise, ignore_index=True).sort_values(["layer", "neuron", "other_model"],
                                                                      kind="stable", ignore_index=True)
    return pd.concat(excess, ignore_index=True)[EXCESS_COLUMNS], pairwise_df[PAIRWISE_COLUMNS]


class UniversalNeuronAnalyzer:
    """Selects universal neurons from an excess-correlation table."""

    def __init__(self, excess_df: pd.DataFrame):
        self.excess_df = excess_df

    def identify_universal_neurons(self, excess_threshold: float = 0.5, top_k: int | None = None) -> pd.DataFrame:
        """Neurons with excess correlation >= threshold, or the top_k highest when given;
        sorted by descending excess correlation."""
        ranked = self.excess_df.sort_values("excess_correlation", ascending=False, kind="stable")
        if top_k is not None:
            return ranked.head(top_k).reset_index(drop=True)
        return ranked[ranked["excess_correlation"] >= excess_threshold].reset_index(drop=True)

    def layer_summary(self, universal_df: pd.DataFrame) -> pd.DataFrame:
        """Per layer: neurons analysed, universal count and fraction."""
        total = self.excess_df.groupby("layer").size().rename("n_neurons")
        count = universal_df.groupby("layer").size().reindex(total.index, fill_value=0).rename("n_universal")
        out = pd.concat([total, count], axis=1).reset_index()
        out["fraction"] = out["n_universal"] / out["n_neurons"]
        return out
