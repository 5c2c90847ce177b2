"""Terminal summary of a run (rich tables)."""
from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.table import Table


def print_summary(console: Console, title: str, layer_summary: pd.DataFrame, universal_df: pd.DataFrame,
                  results_dir: str, top: int = 10) -> None:
    """Neurons analysed, universal count and fraction per layer, and the top neurons."""
    table = Table(title=f"Universal neurons: {title}")
    for col in ("layer", "neurons", "universal", "fraction"):
        table.add_column(col, justify="right")
    for row in layer_summary.itertuples():
        table.add_row(str(row.layer), str(row.n_neurons), str(row.n_universal), f"{row.fraction:.2%}")
    total, n_univ = int(layer_summary["n_neurons"].sum()), int(layer_summary["n_universal"].sum())
    table.add_row("all", str(total), str(n_univ), f"{n_univ / max(total, 1):.2%}", style="bold")
    console.print(table)
    if len(universal_df):
        top_table = Table(title=f"Top {min(top, len(universal_df))} universal neurons")
        for col in ("layer", "neuron", "excess", "mean corr", "mean baseline"):
            top_table.add_column(col, justify="right")
        for row in universal_df.head(top).itertuples():
            top_table.add_row(str(row.layer), str(row.neuron), f"{row.excess_correlation:.3f}",
                              f"{row.mean_corr:.3f}", f"{row.mean_baseline:.3f}")
        console.print(top_table)
    console.print(f"Results: [bold]{results_dir}[/bold]")
