"""From excess-correlation scores to the set of universal neurons."""
from __future__ import annotations

import pandas as pd

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
