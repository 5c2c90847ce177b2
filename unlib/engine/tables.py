"""The excess-correlation tables of a reference model (excess_correlation_scores.csv and
pairwise_correlations.csv) from its per-layer results, with the split-half error."""
from __future__ import annotations

import numpy as np
import pandas as pd

from unlib.engine.results import DEAD_MATCH, LayerResult

EXCESS_COLUMNS = ["layer", "neuron", "excess_correlation", "n_models_compared",
                  "max_corr", "mean_corr", "min_corr", "max_baseline", "mean_baseline", "min_baseline"]
# After the split-half columns (the columns before keep their places): the neuron is constant
# over the analysed tokens, so it has no best match (max_layer/max_neuron DEAD_MATCH).
DEAD_COLUMN = "dead"
SPLIT_HALF_COLUMNS = ["excess_half_a", "excess_half_b", "excess_se", "excess_ci_low", "excess_ci_high"]
PAIRWISE_COLUMNS = ["layer", "neuron", "other_model", "max_corr", "max_layer", "max_neuron", "baseline_max_corr"]
Z_95 = 1.96  # two-sided 95 % normal quantile


def split_half_error(half_a: np.ndarray, half_b: np.ndarray, half_rows: tuple[int, int] | None = None
                     ) -> np.ndarray:
    """Standard error of a layer's full-sample excess correlations from its two halves'.

    Per neuron se_i = |a_i - b_i| sqrt(n_A n_B) / n: an estimate's variance falls as 1/rows,
    so var(a - b) = v (1/n_A + 1/n_B) for two independent halves and the full sample's is
    v / n (|a_i - b_i| / 2 for equal halves, also where `half_rows` is None). With one degree
    of freedom it is often far too small, so it is floored by the layer's pooled
    se_L = sqrt(mean_i se_i^2): se = max(se_i, se_L)."""
    n_a, n_b = half_rows or (1, 1)
    per_neuron = np.abs(half_a - half_b) * np.sqrt(n_a * n_b) / (n_a + n_b)
    pooled = np.sqrt(np.mean(per_neuron ** 2))
    return np.maximum(per_neuron, pooled)


def excess_tables(results: list[LayerResult], model_names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(excess scores, pairwise correlations) for the reference model's neurons.

    excess_correlation = mean over other models of (max corr - max rotated corr, the
    latter averaged over rotation samples); excess_half_a/b the same on each half of the
    rows; excess_se (split_half_error) and the 95 % interval excess +- 1.96 excess_se."""
    excess, pairwise = [], []
    for r in sorted(results, key=lambda r: r.layer):
        d = r.max_corr.shape[1]
        baseline = r.baseline_max_corr.mean(axis=1)  # (others, neurons)
        score = (r.max_corr - baseline).mean(axis=0)
        half_a, half_b = (r.max_corr_halves - r.baseline_max_corr_halves.mean(axis=2)).mean(axis=1)
        se = split_half_error(half_a, half_b, r.half_rows)
        excess.append(pd.DataFrame({
            "layer": r.layer, "neuron": np.arange(d),
            "excess_correlation": score,
            "n_models_compared": len(r.others),
            "max_corr": r.max_corr.max(axis=0), "mean_corr": r.max_corr.mean(axis=0),
            "min_corr": r.max_corr.min(axis=0), "max_baseline": baseline.max(axis=0),
            "mean_baseline": baseline.mean(axis=0), "min_baseline": baseline.min(axis=0),
            "excess_half_a": half_a, "excess_half_b": half_b, "excess_se": se,
            "excess_ci_low": score - Z_95 * se, "excess_ci_high": score + Z_95 * se,
            DEAD_COLUMN: (r.max_layer == DEAD_MATCH).all(axis=0)}))
        for k, m in enumerate(r.others):
            pairwise.append(pd.DataFrame({
                "layer": r.layer, "neuron": np.arange(d), "other_model": model_names[m],
                "max_corr": r.max_corr[k], "max_layer": r.max_layer[k], "max_neuron": r.max_neuron[k],
                "baseline_max_corr": baseline[k]}))
    pairwise_df = pd.concat(pairwise, ignore_index=True).sort_values(["layer", "neuron", "other_model"],
                                                                      kind="stable", ignore_index=True)
    return (pd.concat(excess, ignore_index=True)[EXCESS_COLUMNS + SPLIT_HALF_COLUMNS + [DEAD_COLUMN]],
            pairwise_df[PAIRWISE_COLUMNS])
