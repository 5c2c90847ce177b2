"""Universal neurons against the rest, tested: for each neuron statistic, a two-sided
Mann-Whitney U test of the universal neurons against the other live neurons, its effect size
(Cliff's delta), and Holm's correction across the statistics, so that "universal neurons
differ" is said only of a statistic whose corrected p-value is below ALPHA."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

ALPHA = 0.05
COLUMNS = ["statistic", "n_universal", "n_rest", "universal_median", "rest_median", "cliffs_delta", "mann_whitney_u",
           "p", "p_holm", "differs"]


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control without assuming
    independence): the i-th smallest p times (m - i), made non-decreasing, capped at 1. NaN
    p-values (untestable statistics) stay NaN and do not count in m."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[index]))
        out[index] = running
    return out


def cliffs_delta(u: float, n_a: int, n_b: int) -> float:
    """Cliff's delta from the Mann-Whitney U of sample a: P(a > b) - P(a < b) over all pairs, in
    [-1, 1] (positive: a tends to be larger); the rank-biserial correlation."""
    return 2 * u / (n_a * n_b) - 1


def universal_vs_rest(stats: pd.DataFrame, universal: pd.DataFrame, excess: pd.DataFrame | None = None,
                      columns: list[str] | None = None) -> pd.DataFrame:
    """universal_vs_rest.csv: per statistic of `stats` (neuron_stats.csv; default every column
    but layer and neuron), the universal neurons against the rest (not universal, not dead in
    `excess`'s `dead` column): medians, Cliff's delta, U, the two-sided p-value, Holm's
    adjusted p-value across the statistics and whether it is below ALPHA. Missing values of a
    statistic are left out of its test; with fewer than two neurons on a side it is not tested."""
    columns = columns or [c for c in stats.columns if c not in ("layer", "neuron")]
    keys = pd.MultiIndex.from_frame(stats[["layer", "neuron"]])
    is_universal = keys.isin(pd.MultiIndex.from_frame(universal[["layer", "neuron"]]))
    is_dead = np.zeros(len(stats), dtype=bool)
    if excess is not None and "dead" in excess.columns:
        dead = excess.loc[excess["dead"].astype(bool), ["layer", "neuron"]]
        is_dead = keys.isin(pd.MultiIndex.from_frame(dead))
    rows = []
    for column in columns:
        values = stats[column].to_numpy(dtype=float)
        a = values[is_universal & ~np.isnan(values)]
        b = values[~is_universal & ~is_dead & ~np.isnan(values)]
        u = p = delta = np.nan
        if len(a) >= 2 and len(b) >= 2 and np.ptp(np.concatenate([a, b])) > 0:
            u, p = mannwhitneyu(a, b, alternative="two-sided")
            delta = cliffs_delta(float(u), len(a), len(b))
        rows.append({"statistic": column, "n_universal": len(a), "n_rest": len(b),
                     "universal_median": np.median(a) if len(a) else np.nan,
                     "rest_median": np.median(b) if len(b) else np.nan, "cliffs_delta": delta,
                     "mann_whitney_u": float(u), "p": float(p)})
    table = pd.DataFrame(rows, columns=COLUMNS[:-2])
    table["p_holm"] = holm(table["p"].to_numpy())
    table["differs"] = table["p_holm"] < ALPHA
    return table


def differences_sentence(table: pd.DataFrame) -> str:
    """In words, the statistics in which universal neurons differ from the rest (Holm-corrected
    p < ALPHA), each with its direction and Cliff's delta; or that none does."""
    differ = table[table["differs"]]
    if differ.empty:
        return (f"No statistic differs between the universal neurons and the rest at Holm-corrected p < {ALPHA} "
                f"(two-sided Mann-Whitney U tests across {int(table['p'].notna().sum())} statistics).")
    parts = [f"{r.statistic} ({'higher' if r.cliffs_delta > 0 else 'lower'}, Cliff's delta {r.cliffs_delta:+.2f}, "
             f"p = {r.p_holm:.2g})" for r in differ.itertuples()]
    return (f"Universal neurons differ from the rest (two-sided Mann-Whitney U, Holm-corrected across "
            f"{int(table['p'].notna().sum())} statistics, p < {ALPHA}) in: {', '.join(parts)}.")
