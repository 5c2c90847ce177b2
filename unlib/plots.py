"""The run's figures (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from unlib.store import atomic_path  # noqa: E402

PROPERTIES = [("l2_penalty", "L2 penalty (|w_in|² + |w_out|²)"), ("sparsity", "activation frequency (pre > 0)"),
              ("act_skew", "pre-activation skew"), ("act_kurt", "pre-activation kurtosis"),
              ("vocab_kurt", "vocab composition kurtosis"), ("input_bias", "input bias")]


def value_range(a: float, b: float) -> str:
    """'low–high' of two values; the one that exists, or '—' for none."""
    values = sorted(v for v in (a, b) if not np.isnan(v))
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "—"
    return f"{values[0]:.2f}–{values[1]:.2f}"


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


def corr_vs_baseline(excess_df: pd.DataFrame, threshold: float, path: str | Path, title: str = "") -> None:
    """The paper's scatter: per layer, each neuron's mean max correlation with the other
    models against the same for the rotated baseline."""
    layers = sorted(excess_df["layer"].unique())
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        d = excess_df[excess_df["layer"] == layer]
        universal = d["excess_correlation"] >= threshold
        ax.scatter(d.loc[~universal, "mean_baseline"], d.loc[~universal, "mean_corr"], s=4, color="#8c8c8c", alpha=0.5)
        ax.scatter(d.loc[universal, "mean_baseline"], d.loc[universal, "mean_corr"], s=6, color="#c44e52")
        ax.plot([0, 1], [0, 1], color="black", lw=0.6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("baseline (rotated) max corr", fontsize=8)
        ax.set_ylabel("max corr", fontsize=8)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(f"Max correlation against rotated baseline {title} (red: universal)")
    fig.tight_layout()
    _save(fig, Path(path))


def activation_histogram_svg(values, title: str, bins: int = 50) -> str:
    """A small histogram (log counts) of one neuron's activations, as an SVG document: drawn
    directly rather than by matplotlib, which took half a second per card."""
    from html import escape

    values = np.asarray(values, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    high = high if high > low else low + 1.0
    counts, _ = np.histogram(values, bins=bins, range=(low, high))
    width, height, left, right, top, bottom = 306, 171, 44, 8, 18, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    top_log = math.log10(max(int(counts.max(initial=0)), 1)) + 0.1  # log scale from 1 token (height 0)
    bar_w = plot_w / bins
    bars = "".join(
        f'<rect x="{left + i * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.2f}" height="{h:.1f}"/>'
        for i, c in enumerate(counts) if c > 0 for h in [plot_h * max(math.log10(c), 0.02 * top_log) / top_log])
    text = 'font-family="sans-serif" font-size="9" fill="#333"'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"><title>{escape(title)}</title>'
            f'<text x="{left + plot_w / 2}" y="12" text-anchor="middle" {text}>{escape(title)}</text>'
            f'<g fill="#4c72b0">{bars}</g>'
            f'<path d="M{left} {top}V{top + plot_h}H{left + plot_w}" stroke="#333" fill="none"/>'
            f'<text x="{left}" y="{top + plot_h + 11}" text-anchor="middle" {text}>{low:.3g}</text>'
            f'<text x="{left + plot_w}" y="{top + plot_h + 11}" text-anchor="middle" {text}>{high:.3g}</text>'
            f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" {text}>activation</text>'
            f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" {text}>{10 ** top_log:.3g}</text>'
            f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" {text}>1</text>'
            f'<text x="10" y="{top + plot_h / 2}" text-anchor="middle" transform="rotate(-90 10 {top + plot_h / 2})" '
            f'{text}>tokens (log)</text></svg>')


def universality_by_checkpoint_plot(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Universal fraction per checkpoint and layer; error bars span the fractions selected
    on each half of the tokens."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer, d in table.groupby(table["layer"].astype(str)):
        line, = ax.plot(d["checkpoint"], 100 * d["fraction"], marker="o", lw=2.5 if layer == "all" else 1.2,
                        color="black" if layer == "all" else None,
                        label=f"layer {layer}" if layer != "all" else "all layers")
        low = 100 * np.minimum(d["fraction_half_a"], d["fraction_half_b"])
        high = 100 * np.maximum(d["fraction_half_a"], d["fraction_half_b"])
        ax.errorbar(d["checkpoint"], (low + high) / 2, yerr=(high - low) / 2, fmt="none", capsize=3,
                    color=line.get_color(), lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("universal neurons (%)")
    ax.set_title(f"Universal neurons across training {title}\n(error bars: selected on each half of the tokens)")
    ax.legend(fontsize=8)
    _save(fig, Path(path))


def matrix_heatmap(matrix: pd.DataFrame, path: str | Path, title: str, label: str,
                   halves: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> None:
    """A [0, 1] matrix over checkpoints, each cell annotated with its value and, given the
    same matrix on each half of the tokens (`halves`), their range below it."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(matrix.values.astype(float), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(matrix.columns)), [str(c) for c in matrix.columns])
    ax.set_yticks(range(len(matrix.index)), [str(i) for i in matrix.index])
    for (i, j), value in np.ndenumerate(matrix.values.astype(float)):
        if not np.isnan(value):
            text = f"{value:.2f}"
            if halves is not None:
                text += "\n" + value_range(halves[0].iat[i, j], halves[1].iat[i, j])
            ax.text(j, i, text, ha="center", va="center", fontsize=9 if halves is None else 7,
                    color="white" if value < 0.6 else "black")
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("checkpoint")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    _save(fig, Path(path))


def trajectories_plot(trajectories: pd.DataFrame, path: str | Path, top: int = 20, title: str = "") -> None:
    columns = [c for c in trajectories.columns if c.startswith("checkpoint_")]
    steps = [int(c.split("_")[1]) for c in columns]
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in trajectories.head(top).itertuples(index=False):
        ax.plot(steps, [getattr(row, c) for c in columns], marker=".", lw=1, label=f"L{row.layer}.{row.neuron}")
    ax.set_xlabel("training step")
    ax.set_ylabel("excess correlation")
    ax.set_title(f"Excess correlation of the top {min(top, len(trajectories))} neurons across training {title}")
    if len(trajectories):
        ax.legend(fontsize=6, ncol=2)
    _save(fig, Path(path))


def distributions_plot(excess: dict[int, pd.DataFrame], path: str | Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for step in sorted(excess):
        ax.hist(excess[step]["excess_correlation"], bins=60, histtype="step", lw=1.5, label=f"step {step}")
    ax.set_yscale("log")
    ax.set_xlabel("excess correlation")
    ax.set_ylabel("neurons (log scale)")
    ax.set_title(f"Excess correlation distribution per checkpoint {title}")
    ax.legend(fontsize=8)
    _save(fig, Path(path))


ABLATION_METRICS = [("delta_loss", "loss change (nats)"), ("kl", "KL(original || ablated) per token (nats)")]


def ablation_impact_plot(table: pd.DataFrame, summary: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Per scope, the universal set's loss change and KL (red) against those of the matched
    random sets (grey dots, the bar their 5-95 % range)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    scopes = list(summary["scope"])
    for ax, (metric, label) in zip(axes, ABLATION_METRICS):
        for x, row in enumerate(summary.itertuples(index=False)):
            values = table[(table["scope"] == row.scope) & table["condition"].str.startswith("random-")][metric]
            jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.scatter(x + jitter, values, s=10, color="#8c8c8c", label="random sets" if x == 0 else None)
            ax.vlines(x + 0.25, getattr(row, f"random_{metric}_q05"), getattr(row, f"random_{metric}_q95"),
                      color="#4c72b0", lw=3, label="random 5-95 %" if x == 0 else None)
            ax.scatter([x], [getattr(row, f"universal_{metric}")], s=60, marker="D", color="#c44e52", zorder=3,
                       label="universal" if x == 0 else None)
        ax.set_xticks(range(len(scopes)), scopes)
        ax.set_xlim(-0.6, max(len(scopes), 1) - 0.4)
        ax.set_ylabel(label)
        ax.axhline(0, color="black", lw=0.5)
        if scopes:
            ax.legend(fontsize=8)
    if not scopes:
        axes[0].text(0.5, 0.5, "no universal neurons:\nnothing to ablate", ha="center", va="center",
                     transform=axes[0].transAxes)
    fig.suptitle(f"Ablation of universal neurons against matched random neurons {title}")
    fig.tight_layout()
    _save(fig, Path(path))


def ablation_by_checkpoint_plot(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Per scope across checkpoints, the universal set's loss change and KL (solid) against the
    matched random sets' mean (dashed) and 5-95 % range (shaded); one legend, below the axes,
    where it covers no data."""
    legend_rows = -(-2 * table["scope"].nunique() // 3)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4 + 0.25 * legend_rows))
    for ax, (metric, label) in zip(axes, ABLATION_METRICS):
        for scope, d in table.groupby("scope", sort=False):
            line, = ax.plot(d["checkpoint"], d[f"universal_{metric}"], marker="o", lw=2.5 if scope == "all" else 1.2,
                            color="black" if scope == "all" else None, label=f"{scope}: universal")
            ax.plot(d["checkpoint"], d[f"random_{metric}_mean"], ls="--", color=line.get_color(), lw=1,
                    label=f"{scope}: random mean, 5-95 %")
            ax.fill_between(d["checkpoint"], d[f"random_{metric}_q05"], d[f"random_{metric}_q95"],
                            color=line.get_color(), alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
    bottom = 0.0
    if table.empty:
        axes[0].text(0.5, 0.5, "no universal neurons at any checkpoint:\nnothing to ablate", ha="center", va="center",
                     transform=axes[0].transAxes)
    else:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
        bottom = (0.28 * legend_rows + 0.1) / fig.get_figheight()
    fig.suptitle(f"Ablation of universal neurons across training {title}")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    _save(fig, Path(path))


def family_shares_plot(counts: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Each family's share of the universal neurons beside its share of all neurons (family_counts.csv),
    the families whose Holm-corrected Fisher test says universal neurons differ marked with *."""
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(counts) + 1.5))
    y = np.arange(len(counts))
    ax.barh(y - 0.2, counts["share_universal"], height=0.4, color="#c44e52", label="universal neurons")
    ax.barh(y + 0.2, counts["share_all"], height=0.4, color="#4c72b0", label="all neurons")
    marks = np.where(counts["enriched"] != "", " *", "")
    ax.set_yticks(y, [f"{f}{m}" for f, m in zip(counts["family"], marks)])
    ax.invert_yaxis()
    ax.set_xlabel("share of the neurons")
    ax.set_title(f"Neuron families {title}\n* universal neurons differ from the rest (Fisher, Holm p < 0.05)")
    ax.legend(loc="lower right")
    _save(fig, Path(path))


def families_by_checkpoint_plot(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Per family across training: its count among the universal neurons (left) and its share
    of all neurons (right); a ring where universal neurons hold it more often than the rest."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for family, group in table.groupby("family", sort=False):
        group = group.sort_values("checkpoint")
        line, = left.plot(group["checkpoint"], group["n_universal"], marker="o", label=family)
        more = group[group["enriched"] == "more"]
        left.scatter(more["checkpoint"], more["n_universal"], s=160, facecolors="none", edgecolors=line.get_color())
        right.plot(group["checkpoint"], group["share_all"], marker="o", color=line.get_color())
    left.set_xlabel("training step")
    left.set_ylabel("universal neurons of the family")
    left.set_title("among universal neurons\n(ring: more often than the rest, Fisher, Holm p < 0.05)")
    right.set_xlabel("training step")
    right.set_ylabel("share of all neurons")
    right.set_title("among all neurons")
    left.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Neuron families across training {title}")
    _save(fig, Path(path))


def interventions_plot(sweep: pd.DataFrame, summary: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """The causal checks: the next-token entropy against the fixed activation of the entropy
    candidates (left), and the BOS attention of its head for each deactivation candidate
    (right), with the random neurons of the same layer in grey."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind in zip(axes, ("entropy", "deactivation")):
        rows = summary[summary["kind"] == kind]
        fixed = sweep[(sweep["sweep"] == kind) & (sweep["layer"] >= 0)]
        candidates = set(zip(rows["layer"], rows["neuron"]))
        is_control = np.array([(l, n) not in candidates for l, n in zip(fixed["layer"], fixed["neuron"])], dtype=bool)
        for r in rows.itertuples():
            controls = fixed[(fixed["layer"] == r.layer).to_numpy() & is_control]
            for _, group in controls.groupby("neuron"):
                ax.plot(group["value"], group[r.metric], color="#bbbbbb", lw=0.7, zorder=1)
            own = fixed[(fixed["layer"] == r.layer) & (fixed["neuron"] == r.neuron)]
            head = f" → head {r.head_layer}.{r.head}" if kind == "deactivation" else ""
            ax.plot(own["value"], own[r.metric], marker="o", lw=2, zorder=2,
                    label=f"L{r.layer}.{r.neuron}{head} (p = {r.p:.2g})")
        ax.set_xlabel("fixed post-activation")
        ax.set_ylabel("next-token entropy (nats)" if kind == "entropy" else "attention to BOS")
        ax.set_title("entropy candidates" if kind == "entropy" else "attention-deactivation candidates")
        if len(rows):
            ax.legend(fontsize=8)
    fig.suptitle(f"Causal checks {title}; grey: random neurons of the candidates' layers")
    _save(fig, Path(path))
