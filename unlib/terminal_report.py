"""Reports of a run in the terminal: the summary, the ablation and the comparison across
checkpoints as rich tables."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from unlib.ablation import few_documents_warning
from unlib.families import read_counts


def print_summary(console: Console, title: str, layer_summary: pd.DataFrame, universal_df: pd.DataFrame,
                  results_dir: str, families: pd.DataFrame, family_counts: pd.DataFrame, top: int = 10) -> None:
    """Neurons analysed, universal count and fraction per layer, the top neurons with their
    families and best features, and the families' counts."""
    table = Table(title=f"Universal neurons: {title}")
    dead = "n_dead" in layer_summary.columns  # dead: constant over the tokens, never universal
    for col in ("layer", "neurons", "universal", "fraction") + (("dead",) if dead else ()):
        table.add_column(col, justify="right")
    for row in layer_summary.itertuples():
        table.add_row(str(row.layer), str(row.n_neurons), str(row.n_universal), f"{row.fraction:.2%}",
                      *([str(row.n_dead)] if dead else []))
    total, n_univ = int(layer_summary["n_neurons"].sum()), int(layer_summary["n_universal"].sum())
    table.add_row("all", str(total), str(n_univ), f"{n_univ / max(total, 1):.2%}",
                  *([str(int(layer_summary["n_dead"].sum()))] if dead else []), style="bold")
    console.print(table)
    if len(universal_df):
        top_table = Table(title=f"Top {min(top, len(universal_df))} universal neurons")
        for col in ("layer", "neuron", "excess", "mean corr", "mean baseline", "family", "best feature (VR)"):
            top_table.add_column(col, justify="right")
        labels = families.set_index(["layer", "neuron"])
        for row in universal_df.head(top).itertuples():
            label = labels.loc[(row.layer, row.neuron)]
            top_table.add_row(str(row.layer), str(row.neuron), f"{row.excess_correlation:.3f}",
                              f"{row.mean_corr:.3f}", f"{row.mean_baseline:.3f}", str(label["family"]),
                              f"{label['best_feature']} ({label['best_vr']:.2f})")
        console.print(top_table)
    counted = family_counts[family_counts["n_universal"] > 0].sort_values("n_universal", ascending=False)
    differ = family_counts[family_counts["enriched"] != ""]
    console.print("Families of the universal neurons: " + ", ".join(f"{r.n_universal} {r.family}" for r in
                                                                     counted.itertuples())
                  + (f" (differing from the rest: {', '.join(f'{r.family} ({r.enriched})' for r in differ.itertuples())})"
                     if len(differ) else " (no family differs from the rest, Fisher, Holm)"), soft_wrap=True)
    console.print(f"Results: [bold]{results_dir}[/bold]", soft_wrap=True)


def print_ablation(console: Console, results_dir: Path) -> None:
    """The ablation summary of a run (ablation_summary.csv): per scope, the universal set's loss
    change and KL against the matched random sets' mean and 5-95 % range."""
    path = results_dir / "ablation_summary.csv"
    if not path.exists():  # TOP_K: no ablation is run
        console.print("Ablation: not run with TOP_K (see the report)")
        return
    summary = pd.read_csv(path)
    if summary.empty:
        console.print("Ablation: no universal neurons, nothing to ablate")
        return
    run = json.loads((results_dir / "run.json").read_text()) if (results_dir / "run.json").exists() else {}
    documents = run.get("ablation_documents")
    warning = few_documents_warning(run.get("ablation_tokens") or 0, documents)
    if warning:
        console.print(f"[bold yellow]Warning:[/bold yellow] {warning}")
    held_out = f", {run.get('ablation_tokens'):,} held-out tokens from {documents} documents" if documents else ""
    matched = "layer and activation frequency" if run.get("ablation_control", "matched") == "matched" else "layer"
    table = Table(title=f"Ablation: universal neurons against random sets matched on {matched} (nats{held_out})")
    for col in ("scope", "neurons", "measure", "universal", "random mean", "random 5-95 %", "z", "p"):
        table.add_column(col, justify="right")
    for row in summary.itertuples(index=False):
        for metric, name in (("delta_loss", "Δloss"), ("kl", "KL")):
            table.add_row(row.scope, str(row.n_neurons), name, f"{getattr(row, f'universal_{metric}'):.4g}",
                          f"{getattr(row, f'random_{metric}_mean'):.4g}", _random_range(row, metric),
                          f"{getattr(row, f'{metric}_z'):.2f}", f"{getattr(row, f'{metric}_p'):.3g}")
    console.print(table)


def _random_range(row, metric: str) -> str:
    """'q05 to q95' of the random sets' metric in an ablation summary row."""
    return f"{getattr(row, f'random_{metric}_q05'):.4g} to {getattr(row, f'random_{metric}_q95'):.4g}"


def print_comparison(console: Console, compare_dir: Path) -> None:
    """Universal fraction per checkpoint, the persistence matrix, the ablation and the
    statistics in which universal neurons differ from the rest, from compare's CSVs."""
    by_checkpoint = pd.read_csv(compare_dir / "universality_by_checkpoint.csv")
    table = Table(title="Universal neurons across training")
    for col in ("checkpoint", "universal", "fraction", "mean excess", "q99 excess"):
        table.add_column(col, justify="right")
    for row in by_checkpoint[by_checkpoint["layer"].astype(str) == "all"].itertuples():
        table.add_row(str(row.checkpoint), str(row.n_universal), f"{row.fraction:.2%}", f"{row.mean_excess:.3f}",
                      f"{row.q99_excess:.3f}")
    console.print(table)
    persistence = pd.read_csv(compare_dir / "persistence.csv", index_col=0)
    matrix = Table(title="Persistence: fraction of the row step's universal neurons still universal at the column's")
    matrix.add_column("from \\ to", justify="right")
    for col in persistence.columns:
        matrix.add_column(str(col), justify="right")
    for step, row in persistence.iterrows():
        matrix.add_row(str(step), *("" if pd.isna(v) else f"{v:.2f}" for v in row))
    console.print(matrix)
    families = read_counts(compare_dir / "families_by_checkpoint.csv")
    table = Table(title="Neuron families across training: universal / all neurons (▲ more often than the rest)")
    steps = sorted(families["checkpoint"].unique())
    table.add_column("family")
    for step in steps:
        table.add_column(str(step), justify="right")
    for family, group in families.groupby("family", sort=False):
        cells = group.set_index("checkpoint")
        table.add_row(family, *(f"{cells.loc[s, 'n_universal']} / {cells.loc[s, 'n_all']}"
                                f"{' ▲' if cells.loc[s, 'enriched'] == 'more' else ''}" for s in steps))
    console.print(table)
    ablation_path = compare_dir / "ablation_by_checkpoint.csv"
    if ablation_path.exists():
        ablation = pd.read_csv(ablation_path)
        table = Table(title="Ablation of the universal set across training (all layers, nats)")
        for col in ("checkpoint", "neurons", "measure", "universal", "random mean", "random 5-95 %", "p"):
            table.add_column(col, justify="right")
        for row in ablation[ablation["scope"] == "all"].itertuples(index=False):
            for metric, name in (("delta_loss", "Δloss"), ("kl", "KL")):
                table.add_row(str(row.checkpoint), str(row.n_neurons), name, f"{getattr(row, f'universal_{metric}'):.4g}",
                              f"{getattr(row, f'random_{metric}_mean'):.4g}", _random_range(row, metric),
                              f"{getattr(row, f'{metric}_p'):.3g}")
        console.print(table)
    contrasts = pd.read_csv(compare_dir / "universal_vs_rest_by_checkpoint.csv")
    table = Table(title="Universal neurons against the rest (Mann-Whitney U, Holm-corrected p < 0.05; Cliff's delta)")
    for col in ("checkpoint", "statistics that differ"):
        table.add_column(col, justify="right" if col == "checkpoint" else "left")
    for step, group in contrasts.groupby("checkpoint", sort=True):
        differ = group[group["differs"].astype(bool)]
        table.add_row(str(step), ", ".join(f"{r.statistic} {r.cliffs_delta:+.2f}" for r in differ.itertuples())
                      or "none")
    console.print(table)
    console.print(f"Comparison: [bold]{compare_dir}[/bold] (compare.html)", soft_wrap=True)
