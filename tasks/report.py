"""Reports: the per-run HTML report, and the comparison across training checkpoints."""
from __future__ import annotations

import luigi
import pandas as pd

from tasks.analysis import Plots, UniversalNeuronsAnalysis, write_csv
from tasks.common import PipelineTask, RunParams, store
from tasks.data import TokenizeDataset
from tasks.zoo import model_requirement
from unlib import compare, plots
from unlib.data import read_tokens
from unlib.models import load_model, load_tokenizer
from unlib.report import compare_report_html, neuron_cards, run_report_html
from unlib.selection import UniversalNeuronAnalyzer, split_half_sets
from unlib.store import atomic_path, read_json

TOP_CARDS = 20


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class RunReport(RunParams, PipelineTask):
    """report.html: one self-contained page with the run's parameters, summary (next to
    published figures), plots, universal-neuron properties and neuron cards."""

    def requires(self):
        return {"analysis": self.clone(UniversalNeuronsAnalysis), "plots": self.clone(Plots),
                "tokens": self.clone(TokenizeDataset), "model": model_requirement(self.model_set.models[self.reference])}

    def output(self):
        return luigi.LocalTarget(self.results_dir() / "report.html")

    def run(self):
        d = self.results_dir()
        run = read_json(self.input()["analysis"].path)
        run["run_name"] = d.name
        excess = pd.read_csv(d / "excess_correlation_scores.csv")
        universal = pd.read_csv(d / "universal_neurons.csv")
        pairwise = pd.read_csv(d / "pairwise_correlations.csv")
        stats = pd.read_csv(d / "neuron_stats.csv")
        figures = {name: d / "plots" / f"{name}.png" for name in Plots.NAMES}
        figures["max_correlation_vs_baseline"] = d / "plots" / "max_correlation_vs_baseline.png"
        plots.corr_vs_baseline(excess, run["threshold"] if self.top_k is None else universal["excess_correlation"].min(),
                               figures["max_correlation_vs_baseline"], f"({self.model_set.name}, {d.name})")
        self.set_status_message("neuron cards: activations and contexts of the top universal neurons")
        model = load_model(self.model_set.models[self.reference], self.checkpoint, self.device)
        tokens, keep = read_tokens(self.input()["tokens"].path)
        cards = neuron_cards(model, load_tokenizer(self.model_set, store().root), tokens, keep, universal, pairwise,
                             top=TOP_CARDS, batch_size=self.batch_size)
        summary = UniversalNeuronAnalyzer(excess).layer_summary(universal)
        write_text(self.output().path, run_report_html(run, excess, stats, universal, summary, figures, cards))


class CompareCheckpoints(RunParams, PipelineTask):
    """The same analysis at several training steps, and how universality develops."""

    checkpoints = luigi.ListParameter(description="training steps to compare")

    def requires(self):
        return {step: self.clone(UniversalNeuronsAnalysis, checkpoint=step) for step in self.steps}

    @property
    def steps(self) -> list[int]:
        return sorted(int(s) for s in self.checkpoints)

    def output_dir(self):
        return store().compare(self.model_set.name, self.steps, self.variant())

    def output(self):
        return luigi.LocalTarget(self.output_dir() / "compare.html")

    def run(self):
        out = self.output_dir()
        excess, universal = {}, {}
        for step, task in self.requires().items():
            excess[step] = pd.read_csv(task.results_dir() / "excess_correlation_scores.csv")
            universal[step] = pd.read_csv(task.results_dir() / "universal_neurons.csv")
        sets = compare.neuron_sets(universal)
        halves = {step: split_half_sets(e, self.effective_threshold, self.top_k) for step, e in excess.items()}
        by_checkpoint = compare.universality_by_checkpoint(excess, universal, halves)
        persistence, jaccard = compare.persistence(sets), compare.jaccard(sets)
        persistence_halves = tuple(compare.persistence({s: h[i] for s, h in halves.items()}) for i in range(2))
        trajectories = compare.trajectories(excess, sets)
        write_csv(by_checkpoint, out / "universality_by_checkpoint.csv")
        write_csv(persistence.reset_index(), out / "persistence.csv")
        for name, table in zip(("persistence_half_a", "persistence_half_b"), persistence_halves):
            write_csv(table.reset_index(), out / f"{name}.csv")
        write_csv(jaccard.reset_index(), out / "jaccard.csv")
        write_csv(trajectories, out / "neuron_trajectories.csv")
        title = f"({self.model_set.name})"
        figures = {name: out / f"{name}.png" for name in
                   ("universality_by_checkpoint", "persistence", "jaccard", "neuron_trajectories",
                    "excess_correlation_distributions")}
        plots.universality_by_checkpoint_plot(by_checkpoint, figures["universality_by_checkpoint"], title)
        plots.matrix_heatmap(persistence, figures["persistence"], f"Persistence of universal neurons {title}\n"
                             "(below: range over the sets selected on each half of the tokens)",
                             "fraction still universal", persistence_halves)
        plots.matrix_heatmap(jaccard, figures["jaccard"], f"Jaccard overlap of universal sets {title}", "Jaccard")
        plots.trajectories_plot(trajectories, figures["neuron_trajectories"], title=title)
        plots.distributions_plot(excess, figures["excess_correlation_distributions"], title)
        write_text(self.output().path, compare_report_html(self.model_set.name, self.steps, by_checkpoint,
                                                           persistence, jaccard, trajectories, figures,
                                                           persistence_halves))
