"""How universality develops across training checkpoints (Nandan et al. 2025): per-checkpoint
summaries, persistence and Jaccard overlap of universal sets, and neuron trajectories."""
from __future__ import annotations

import numpy as np
import pandas as pd

QUANTILES = (0.5, 0.9, 0.99)


def universality_by_checkpoint(excess: dict[int, pd.DataFrame], universal: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Per checkpoint and layer (and 'all'): n_universal, fraction, mean and quantiles of
    excess correlation."""
    rows = []
    for step in sorted(excess):
        e, u = excess[step], universal[step]
        for layer, group in [*e.groupby("layer"), ("all", e)]:
            n_univ = int((u["layer"] == layer).sum()) if layer != "all" else len(u)
            row = {"checkpoint": step, "layer": layer, "n_neurons": len(group), "n_universal": n_univ,
                   "fraction": n_univ / len(group), "mean_excess": group["excess_correlation"].mean()}
            for q in QUANTILES:
                row[f"q{int(q * 100)}_excess"] = group["excess_correlation"].quantile(q)
            rows.append(row)
    return pd.DataFrame(rows)


def neuron_sets(universal: dict[int, pd.DataFrame]) -> dict[int, set[tuple[int, int]]]:
    return {step: set(zip(df["layer"].astype(int), df["neuron"].astype(int))) for step, df in universal.items()}


def persistence(sets: dict[int, set]) -> pd.DataFrame:
    """persistence[s][s'] = fraction of the neurons universal at s still universal at s'
    (defined for s < s'; NaN elsewhere and where s has no universal neurons)."""
    steps = sorted(sets)
    out = pd.DataFrame(np.nan, index=steps, columns=steps)
    for i, s in enumerate(steps):
        for t in steps[i + 1:]:
            if sets[s]:
                out.loc[s, t] = len(sets[s] & sets[t]) / len(sets[s])
    out.index.name = "from_checkpoint"
    return out


def jaccard(sets: dict[int, set]) -> pd.DataFrame:
    """Jaccard overlap |A & B| / |A | B| of the universal sets of every pair of checkpoints."""
    steps = sorted(sets)
    out = pd.DataFrame(np.nan, index=steps, columns=steps)
    for s in steps:
        for t in steps:
            union = sets[s] | sets[t]
            out.loc[s, t] = len(sets[s] & sets[t]) / len(union) if union else np.nan
    out.index.name = "checkpoint"
    return out


def trajectories(excess: dict[int, pd.DataFrame], sets: dict[int, set]) -> pd.DataFrame:
    """Excess correlation, at every checkpoint, of each neuron universal at any checkpoint,
    and the first checkpoint at which it is universal; most universal at the last first."""
    steps = sorted(excess)
    ever = sorted(set().union(*sets.values()))
    table = pd.DataFrame(ever, columns=["layer", "neuron"])
    for s in steps:
        values = excess[s].set_index(["layer", "neuron"])["excess_correlation"]
        table[f"checkpoint_{s}"] = [values.get(key, np.nan) for key in ever]
    first = []
    for key in ever:
        crossing = [s for s in steps if key in sets[s]]
        first.append(crossing[0] if crossing else np.nan)
    table["first_universal_checkpoint"] = first
    table["last_excess"] = table[f"checkpoint_{steps[-1]}"]
    return table.sort_values("last_excess", ascending=False, kind="stable").drop(columns="last_excess") \
        .reset_index(drop=True)
