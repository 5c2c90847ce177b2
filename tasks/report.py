"""Reports: the per-run HTML report, and the comparison across training checkpoints."""
from __future__ import annotations

from pathlib import Path

import luigi
import pandas as pd

from tasks.ablation import Ablation, Interventions
from tasks.activations import CacheActivations
from tasks.analysis import Plots, SelectUniversal, UniversalNeuronsAnalysis, with_run_feed, write_csv
from tasks.common import ResultTask
from tasks.params import RunParams
from tasks.targets import store
from tasks.data import TokenizeDataset
from tasks.zoo import model_requirement
from unlib import compare, plots
from unlib.activations import ActivationCache
from unlib.families import read_counts
from unlib.html_report import compare_report_html, run_report_html
from unlib.model_loading import load_model, load_tokenizer, training_vocabulary
from unlib.neuron_cards import neuron_cards
from unlib.selection import UniversalNeuronAnalyzer, split_half_sets
from unlib.store import atomic_path, link_file, read_json
from unlib.tokens import read_tokens

TOP_CARDS = 20


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class RunReport(RunParams, ResultTask):
    """report.html: one self-contained page with the run's parameters, summary (next to
    published figures), plots, universal-neuron properties and neuron cards."""

    def requires(self):
        # with TOP_K the page says why there is no ablation instead of running one
        checks = with_run_feed(self, Interventions)
        ablation = {"ablation": self.clone(Ablation), "interventions": checks} if self.top_k is None else {}
        return {"analysis": self.clone(UniversalNeuronsAnalysis), "plots": self.clone(Plots),
                "universal": self.clone(SelectUniversal), "tokens": self.clone(TokenizeDataset),
                "model": model_requirement(self.model_set.models[self.reference]), **ablation}

    def output(self):
        return self.result_target(self.run_dir() / "report.html")

    def write(self):
        analysis = self.input()["analysis"]
        run = read_json(analysis["run"].path)
        run["run_name"] = self.run_name()
        excess = pd.read_csv(analysis["excess_correlation_scores.csv"].path)
        pairwise = pd.read_csv(analysis["pairwise_correlations.csv"].path)
        contrasts = pd.read_csv(analysis["universal_vs_rest.csv"].path)
        universal = pd.read_csv(self.input()["universal"].path)
        figures = {name: Path(target.path) for name, target in self.input()["plots"].items()}
        self.set_status_message("neuron cards: activations and contexts of the top universal neurons")
        model = load_model(self.model_set.models[self.reference], self.checkpoint, self.device)
        tokens, keep = read_tokens(self.input()["tokens"].path)
        cache = self.clone(CacheActivations, model=self.reference).output()  # the run's, if it cached
        families = pd.read_csv(analysis["families.csv"].path)
        cards = neuron_cards(model, load_tokenizer(self.model_set, store().root), tokens, keep, universal, pairwise,
                             top=TOP_CARDS, batch_size=self.batch_size,
                             cache=ActivationCache(cache.path) if cache.exists() else None, families=families,
                             vocabulary=training_vocabulary(self.model_set, store().root))
        summary = UniversalNeuronAnalyzer(excess).layer_summary(universal)
        ablation = interventions = None
        if "ablation" in self.input():
            targets = self.input()["ablation"]
            ablation = {"table": pd.read_csv(targets["table"].path), "summary": pd.read_csv(targets["summary"].path),
                        "neurons": pd.read_csv(targets["neurons"].path), "plot": Path(targets["plot"].path)}
            checks = self.input()["interventions"]
            # shown in the run's folder too (links: the files are shared by every threshold)
            for name, target in checks.items():
                link_file(target.path, self.run_dir() / ("plots" if name.endswith(".png") else "") / name)
            interventions = {"summary": pd.read_csv(checks["interventions_summary.csv"].path),
                             "plot": Path(checks["interventions.png"].path)}
        write_text(self.output().path, run_report_html(run, excess, contrasts, universal, summary, figures, cards,
                                                       ablation, read_counts(analysis["family_counts.csv"].path),
                                                       interventions))


class CompareCheckpoints(RunParams, ResultTask):
    """The same analysis at several training steps, and how universality develops."""

    checkpoints = luigi.ListParameter(description="training steps to compare")

    TABLES = ("universality_by_checkpoint", "persistence", "persistence_half_a", "persistence_half_b", "jaccard",
              "neuron_trajectories", "universal_vs_rest_by_checkpoint", "families_by_checkpoint")
    FIGURES = ("universality_by_checkpoint", "persistence", "jaccard", "neuron_trajectories",
               "excess_correlation_distributions", "families_by_checkpoint")
    ABLATION = "ablation_by_checkpoint"  # its table and figure, unless TOP_K (then no ablation runs)

    def requires(self):
        ablation = {"ablation": {step: self.clone(Ablation, checkpoint=step) for step in self.steps}} \
            if self.top_k is None else {}
        return {"analysis": {step: self.clone(UniversalNeuronsAnalysis, checkpoint=step) for step in self.steps},
                "universal": {step: self.clone(SelectUniversal, checkpoint=step) for step in self.steps},
                **ablation}

    @property
    def steps(self) -> list[int]:
        return sorted(int(s) for s in self.checkpoints)

    def output_dir(self):
        return store().compare(self.model_set.name, self.steps, self.variant())

    def inputs(self) -> dict[str, str]:
        return {**self.token_inputs(), **self.correlation_method(), **{f"{name} at step {step}": fingerprint for step in self.steps
                                          for name, fingerprint in self.clone(checkpoint=step).model_inputs().items()}}

    def output(self):
        out = self.output_dir()
        ablation = {f"{self.ABLATION}.{ext}": self.result_target(out / f"{self.ABLATION}.{ext}")
                    for ext in ("csv", "png")} if self.top_k is None else {}
        return {"report": self.result_target(out / "compare.html"),
                **{f"{name}.csv": self.result_target(out / f"{name}.csv") for name in self.TABLES},
                **{f"{name}.png": self.result_target(out / f"{name}.png") for name in self.FIGURES}, **ablation}

    def write(self):
        excess, universal = {}, {}
        for step, tables in self.input()["analysis"].items():
            excess[step] = pd.read_csv(tables["excess_correlation_scores.csv"].path)
            universal[step] = pd.read_csv(self.input()["universal"][step].path)
        sets = compare.neuron_sets(universal)
        halves = {step: split_half_sets(e, self.effective_threshold, self.top_k) for step, e in excess.items()}
        by_checkpoint = compare.universality_by_checkpoint(excess, universal, halves)
        persistence, jaccard = compare.persistence(sets), compare.jaccard(sets)
        persistence_halves = tuple(compare.persistence({s: h[i] for s, h in halves.items()}) for i in range(2))
        trajectories = compare.trajectories(excess, sets)
        contrasts = pd.concat([pd.read_csv(tables["universal_vs_rest.csv"].path).assign(checkpoint=step)
                               for step, tables in self.input()["analysis"].items()])
        contrasts = contrasts[["checkpoint"] + [c for c in contrasts.columns if c != "checkpoint"]]
        families = compare.families_by_checkpoint({step: read_counts(tables["family_counts.csv"].path)
                                                   for step, tables in self.input()["analysis"].items()})
        out = {name: Path(target.path) for name, target in self.output().items()}
        tables = dict(zip(self.TABLES, [by_checkpoint, persistence.reset_index(),
                                        *(t.reset_index() for t in persistence_halves), jaccard.reset_index(),
                                        trajectories, contrasts, families]))
        for name, table in tables.items():
            write_csv(table, out[f"{name}.csv"])
        title = f"({self.model_set.name})"
        figures = {name: out[f"{name}.png"] for name in self.FIGURES}
        plots.universality_by_checkpoint_plot(by_checkpoint, figures["universality_by_checkpoint"], title)
        plots.matrix_heatmap(persistence, figures["persistence"], f"Persistence of universal neurons {title}\n"
                             "(below: range over the sets selected on each half of the tokens)",
                             "fraction still universal", persistence_halves)
        plots.matrix_heatmap(jaccard, figures["jaccard"], f"Jaccard overlap of universal sets {title}", "Jaccard")
        plots.trajectories_plot(trajectories, figures["neuron_trajectories"], title=title)
        plots.distributions_plot(excess, figures["excess_correlation_distributions"], title)
        plots.families_by_checkpoint_plot(families, figures["families_by_checkpoint"], title)
        ablation = None
        if "ablation" in self.input():
            ablation = compare.ablation_by_checkpoint({step: pd.read_csv(targets["summary"].path)
                                                       for step, targets in self.input()["ablation"].items()})
            write_csv(ablation, out[f"{self.ABLATION}.csv"])
            figures[self.ABLATION] = out[f"{self.ABLATION}.png"]
            plots.ablation_by_checkpoint_plot(ablation, figures[self.ABLATION], title)
        write_text(out["report"], compare_report_html(self.model_set.name, self.steps, by_checkpoint, persistence,
                                                      jaccard, trajectories, figures, persistence_halves, contrasts,
                                                      ablation, families))
