"""The run's figures (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from unlib.store import atomic_path  # noqa: E402

PROPERTIES = [("l2_penalty", "L2 penalty (|w_in|² + |w_out|²)"), ("sparsity", "activation frequency (pre > 0)"),
              ("act_skew", "pre-activation skew"), ("act_kurt", "pre-activation kurtosis"),
              ("vocab_kurt", "vocab composition kurtosis"), ("input_bias", "input bias")]


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


class UniversalNeuronVisualizer:
    """Plots of one run: excess correlations, their layer distribution, and neuron properties."""

    def __init__(self, excess_df: pd.DataFrame, stats_df: pd.DataFrame, threshold: float, title: str = ""):
        self.excess_df = excess_df
        self.stats_df = stats_df
        self.threshold = threshold
        self.title = title

    def excess_distribution(self, path: str | Path) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        values = self.excess_df["excess_correlation"]
        ax.hist(values, bins=60, color="#4c72b0")
        ax.axvline(self.threshold, color="#c44e52", ls="--", label=f"threshold {self.threshold:g}")
        ax.set_yscale("log")
        ax.set_xlabel("excess correlation (max corr − rotated baseline)")
        ax.set_ylabel("neurons (log scale)")
        n_univ = int((values >= self.threshold).sum())
        ax.set_title(f"Excess correlation distribution {self.title}\n"
                     f"{n_univ} of {len(values)} neurons ≥ threshold")
        ax.legend()
        _save(fig, Path(path))

    def universal_by_layer(self, path: str | Path, universal_df: pd.DataFrame) -> None:
        layers = sorted(self.excess_df["layer"].unique())
        total = self.excess_df.groupby("layer").size().reindex(layers)
        count = universal_df.groupby("layer").size().reindex(layers, fill_value=0)
        fig, ax = plt.subplots(figsize=(7, 4))
        bars = ax.bar([str(l) for l in layers], 100 * count / total, color="#55a868")
        for bar, c in zip(bars, count):
            ax.annotate(str(int(c)), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("universal neurons (% of layer)")
        ax.set_title(f"Universal neurons by layer {self.title}\n(bar labels: counts)")
        _save(fig, Path(path))

    def excess_vs_properties(self, path: str | Path) -> None:
        df = self.excess_df.merge(self.stats_df, on=["layer", "neuron"])
        universal = df["excess_correlation"] >= self.threshold
        fig, axes = plt.subplots(2, 3, figsize=(12, 7))
        for ax, (column, label) in zip(axes.flat, PROPERTIES):
            ax.scatter(df.loc[~universal, column], df.loc[~universal, "excess_correlation"], s=4, alpha=0.4,
                       color="#8c8c8c", label="other")
            ax.scatter(df.loc[universal, column], df.loc[universal, "excess_correlation"], s=8,
                       color="#c44e52", label="universal")
            ax.axhline(self.threshold, color="#c44e52", ls="--", lw=0.8)
            ax.set_xlabel(label)
            ax.set_ylabel("excess correlation")
        axes.flat[0].legend(loc="best", fontsize=8)
        fig.suptitle(f"Excess correlation against neuron properties {self.title}")
        fig.tight_layout()
        _save(fig, Path(path))
