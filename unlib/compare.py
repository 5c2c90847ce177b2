"""How universality develops across training checkpoints (Nandan et al. 2025): per-checkpoint
summaries, persistence and Jaccard overlap of universal sets, and neuron trajectories. The
universal fraction and persistence are also given on the sets selected on each half of the
tokens: their spread is the split-half range. The universal set's ablation impact at each
checkpoint is gathered from the runs' ablation summaries."""
from __future__ import annotations

import numpy as np
import pandas as pd

from unlib.ablation import SUMMARY_COLUMNS
from unlib.selection import jaccard_index, neuron_keys

QUANTILES = (0.5, 0.9, 0.99)


def universality_by_checkpoint(excess: dict[int, pd.DataFrame], universal: dict[int, pd.DataFrame],
                               halves: dict[int, tuple[set, set]]) -> pd.DataFrame:
    """Per checkpoint and layer (and 'all'): n_universal, fraction, mean and quantiles of
    excess correlation; then the fraction universal on half A and on half B of the tokens
    (`halves`: per checkpoint, the two half sets) and the Jaccard overlap of those sets."""
    rows = []
    for step in sorted(excess):
        e, u = excess[step], universal[step]
        for layer, group in [*e.groupby("layer"), ("all", e)]:
            n_univ = int((u["layer"] == layer).sum()) if layer != "all" else len(u)
            row = {"checkpoint": step, "layer": layer, "n_neurons": len(group), "n_universal": n_univ,
                   "fraction": n_univ / len(group), "mean_excess": group["excess_correlation"].mean()}
            for q in QUANTILES:
                row[f"q{int(q * 100)}_excess"] = group["excess_correlation"].quantile(q)
            in_layer = [{k for k in half if layer == "all" or k[0] == layer} for half in halves[step]]
            row["fraction_half_a"] = len(in_layer[0]) / len(group)
            row["fraction_half_b"] = len(in_layer[1]) / len(group)
            row["split_half_jaccard"] = jaccard_index(*in_layer)
            rows.append(row)
    return pd.DataFrame(rows)


def neuron_sets(universal: dict[int, pd.DataFrame]) -> dict[int, set[tuple[int, int]]]:
    return {step: neuron_keys(df) for step, df in universal.items()}


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
            out.loc[s, t] = jaccard_index(sets[s], sets[t])
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


def ablation_by_checkpoint(summaries: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """The ablation summaries (unlib.ablation.ablation_summary) of every checkpoint in one table,
    `checkpoint` first; a checkpoint without universal neurons has no rows."""
    frames = [summary.assign(checkpoint=step) for step, summary in sorted(summaries.items()) if len(summary)]
    if not frames:
        return pd.DataFrame(columns=["checkpoint", *SUMMARY_COLUMNS])
    return pd.concat(frames, ignore_index=True)[["checkpoint", *SUMMARY_COLUMNS]]


def families_by_checkpoint(counts: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Every checkpoint's family_counts.csv, `checkpoint` first, every family at every step
    (0 where a step has none of it)."""
    table = pd.concat([c.assign(checkpoint=step) for step, c in sorted(counts.items())], ignore_index=True)
    families = list(dict.fromkeys(table["family"]))
    full = pd.MultiIndex.from_product([sorted(counts), families], names=["checkpoint", "family"])
    table = table.set_index(["checkpoint", "family"]).reindex(full).reset_index()
    table[["n_universal", "n_rest", "n_all"]] = table[["n_universal", "n_rest", "n_all"]].fillna(0).astype(int)
    table["enriched"] = table["enriched"].fillna("")
    return table


def first_above_chance(table: pd.DataFrame) -> dict[str, int | None]:
    """Per family, the first checkpoint at which universal neurons hold it more often than the
    rest do (family_counts' two-sided Fisher test, Holm-corrected: `enriched` == "more")."""
    first = {}
    for family, group in table.groupby("family", sort=False):
        steps = group.loc[group["enriched"] == "more", "checkpoint"]
        first[family] = int(steps.min()) if len(steps) else None
    return first
