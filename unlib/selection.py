"""From excess-correlation scores to the set of universal neurons, and how stable that set
is between the two halves of the tokens."""
from __future__ import annotations

import numpy as np
import pandas as pd

HALF_SCORES = ("excess_half_a", "excess_half_b")


class UniversalNeuronAnalyzer:
    """Selects universal neurons from an excess-correlation table."""

    def __init__(self, excess_df: pd.DataFrame):
        self.excess_df = excess_df

    def identify_universal_neurons(self, excess_threshold: float = 0.5, top_k: int | None = None,
                                   score: str = "excess_correlation") -> pd.DataFrame:
        """Neurons with `score` (default: excess correlation) >= threshold, or the top_k
        highest when given; sorted by descending score. Neurons without a score, and dead
        neurons (constant over the tokens: no best match, see the `dead` column), are never
        selected, whatever the threshold."""
        candidates = self.excess_df
        if "dead" in candidates.columns:
            candidates = candidates[~candidates["dead"].astype(bool)]
        ranked = candidates.dropna(subset=[score]).sort_values(score, ascending=False, kind="stable")
        if top_k is not None:
            return ranked.head(top_k).reset_index(drop=True)
        return ranked[ranked[score] >= excess_threshold].reset_index(drop=True)

    def layer_summary(self, universal_df: pd.DataFrame) -> pd.DataFrame:
        """Per layer: neurons analysed, universal count and fraction, and (where the table
        has the `dead` column) the dead neurons, constant over the tokens."""
        total = self.excess_df.groupby("layer").size().rename("n_neurons")
        count = universal_df.groupby("layer").size().reindex(total.index, fill_value=0).rename("n_universal")
        out = pd.concat([total, count], axis=1).reset_index()
        out["fraction"] = out["n_universal"] / out["n_neurons"]
        if "dead" in self.excess_df.columns:
            dead = self.excess_df.groupby("layer")["dead"].apply(lambda d: int(d.astype(bool).sum()))
            out["n_dead"] = out["layer"].map(dead).astype(int)
        return out


def neuron_keys(df: pd.DataFrame) -> set[tuple[int, int]]:
    """The (layer, neuron) pairs of a table's rows."""
    return set(zip(df["layer"].astype(int), df["neuron"].astype(int)))


def jaccard_index(a: set, b: set) -> float:
    """|A & B| / |A | B|; NaN when both sets are empty."""
    union = a | b
    return len(a & b) / len(union) if union else np.nan


def split_half_sets(excess_df: pd.DataFrame, excess_threshold: float, top_k: int | None = None) -> tuple[set, set]:
    """The universal sets selected, by the same rule, on half A's and on half B's excess."""
    analyzer = UniversalNeuronAnalyzer(excess_df)
    return tuple(neuron_keys(analyzer.identify_universal_neurons(excess_threshold, top_k, score))
                 for score in HALF_SCORES)


def split_half_jaccard(excess_df: pd.DataFrame, excess_threshold: float, top_k: int | None = None) -> float:
    """Jaccard overlap of the universal sets selected on each half of the tokens."""
    return jaccard_index(*split_half_sets(excess_df, excess_threshold, top_k))
