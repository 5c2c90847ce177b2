"""From correlations to results: excess scores, neuron statistics, selection, plots, and
the root task of one analysis run."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import luigi
import numpy as np
import pandas as pd
import torch

from tasks.activations import CacheActivations
from tasks.common import ResultTask, TaskProgress
from tasks.correlation import correlations_of
from tasks.params import CheckpointParams, CorrelationParams, RunParams
from tasks.targets import store
from tasks.data import TokenizeDataset, dataset_id, held_out_tokens
from tasks.zoo import model_requirement
from unlib.activations import ActivationCache
from unlib.contrasts import universal_vs_rest
from unlib.families import explain_neurons, family_counts, write_variance_reduction
from unlib.dataset import DOCUMENT_SEED
from unlib.tokens import read_tokens, token_file_record
from unlib.engine.precision import DOCUMENTED_ERROR, ERROR_BOUND
from unlib.engine.results import LayerResult
from unlib.h5read import H5Reader
from unlib.engine.tables import SPLIT_HALF_COLUMNS, excess_tables
from unlib.checkpoints import model_location
from unlib.model_loading import load_model, load_tokenizer, model_fingerprint, training_vocabulary
from unlib.plots import UniversalNeuronVisualizer, corr_vs_baseline, family_shares_plot
from unlib.selection import UniversalNeuronAnalyzer, jaccard_index, split_half_sets
from unlib.stats import NeuronStatsGenerator
from unlib.store import atomic_path, link_file, write_json

# The tables a run's results folder shows beside its own files, linked from where they are
# kept (keyed by what changes them, so runs differing only in threshold or top-k share them).
SHARED_TABLES = ("excess_correlation_scores.csv", "pairwise_correlations.csv", "neuron_stats.csv",
                 "neuron_explanations.csv", "neuron_roles.csv", "families.csv")
CONTRASTS = "universal_vs_rest.csv"  # each statistic tested, universal neurons against the rest
FAMILY_COUNTS = "family_counts.csv"  # each family among the universal neurons and the rest, tested


def csv_text(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, float_format="%.6g")


def write_csv(df: pd.DataFrame, path: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(csv_text(df), encoding="utf-8")


def write_changed_csv(df: pd.DataFrame, path: str) -> None:
    """write_csv, unless the file already holds exactly this table (a file shared by several
    runs keeps its identity, and its seal, while what it shows is unchanged)."""
    if not os.path.exists(path) or Path(path).read_text(encoding="utf-8") != csv_text(df):
        write_csv(df, path)


class ExcessCorrelation(CorrelationParams, ResultTask):
    """excess_correlation_scores.csv and pairwise_correlations.csv of the reference model, kept
    beside its correlations: the same for every threshold and top-k."""

    def requires(self):
        return correlations_of(self)

    def output(self):
        d = store().correlation_dir(correlations_of(self).run_key(), self.model_set.models[self.reference].model_id)
        # all_references only changes how the correlations were scheduled, not these files
        return {"excess": self.result_target(d / "excess_correlation_scores.csv", ignore=("all_references",)),
                "pairwise": self.result_target(d / "pairwise_correlations.csv", ignore=("all_references",))}

    def write(self):
        targets = self.input()
        results = [LayerResult.load(targets[key].path) for key in sorted(targets) if key[0] == self.reference]
        excess, pairwise = excess_tables(results, [m.name for m in self.model_set.models])
        write_csv(pairwise, self.output()["pairwise"].path)
        write_csv(excess, self.output()["excess"].path)


class NeuronStats(CheckpointParams, ResultTask):
    """neuron_stats.csv: weight and activation statistics of the reference model, kept per
    model, checkpoint and token file (shared by every run on them)."""

    reference = luigi.IntParameter(default=0, description="index of the model in the set")

    def requires(self):
        return {"tokens": self.clone(TokenizeDataset),
                "model": model_requirement(self.model_set.models[self.reference])}

    def inputs(self) -> dict[str, str]:
        """The tokens and the reference model only, by content (not by its place or spelling in
        the set, so every set holding it shares the file)."""
        return {**self.token_inputs(), "model": model_fingerprint(self.model_set.models[self.reference],
                                                                   self.checkpoint)}

    def output(self):
        spec = self.model_set.models[self.reference]
        path = store().neuron_stats(spec.model_id, self.checkpoint, Path(self.clone(TokenizeDataset).output().path))
        return self.result_target(path, ignore=("reference",))

    def write(self):
        tokens, keep = read_tokens(self.input()["tokens"].path)
        model = load_model(self.model_set.models[self.reference], self.checkpoint, self.device)
        with TaskProgress(self, "neuron stats", tokens.shape[0], "sequences") as progress:
            stats = NeuronStatsGenerator(model).compute(tokens, keep, self.batch_size, progress=progress)
        write_csv(stats, self.output().path)


class NeuronFamilies(CheckpointParams, ResultTask):
    """What explains each neuron of the reference model and what its weights do: the neuron
    explanations, roles and families tables and the full variance-reduction matrices, kept per
    model, checkpoint and token file (shared by every run on them). Read from the model's
    activation cache where the run caches (`from_cache`), else from forward passes."""

    reference = luigi.IntParameter(default=0, description="index of the model in the set")
    from_cache = luigi.BoolParameter(default=False, significant=False, description="read the activation cache")
    TABLES = ("neuron_explanations.csv", "neuron_roles.csv", "families.csv")
    MATRIX = "variance_reduction.h5"

    def requires(self):
        cache = {"cache": self.clone(CacheActivations, model=self.reference)} if self.from_cache else {}
        return {"tokens": self.clone(TokenizeDataset), "model": model_requirement(self.model_set.models[self.reference]),
                "stats": self.clone(NeuronStats), **cache}

    def inputs(self) -> dict[str, str]:
        return self.clone(NeuronStats).inputs()

    def output(self):
        spec = self.model_set.models[self.reference]
        folder = store().families(spec.model_id, self.checkpoint, Path(self.clone(TokenizeDataset).output().path))
        return {name: self.result_target(folder / name, ignore=("reference",)) for name in self.TABLES + (self.MATRIX,)}

    def write(self):
        tokens, keep = read_tokens(self.input()["tokens"].path)
        spec = self.model_set.models[self.reference]
        model = load_model(spec, self.checkpoint, self.device)
        cache = ActivationCache(self.input()["cache"].path) if "cache" in self.input() else None
        stats = pd.read_csv(self.input()["stats"].path)
        with TaskProgress(self, "neuron families", int(keep.sum())) as progress:
            explained = explain_neurons(model, load_tokenizer(self.model_set, store().root), tokens, keep, stats,
                                        training_vocabulary(self.model_set, store().root), cache, self.batch_size,
                                        progress)
        out = self.output()
        for name, table in zip(self.TABLES, (explained.explanations, explained.roles, explained.families)):
            write_csv(table, out[name].path)
        write_variance_reduction(out[self.MATRIX].path, explained)


def h5_record(path: str) -> str:
    """The `record` attribute of a store HDF5 file, verified (a damaged file is set aside)."""
    with H5Reader(path) as reader:
        return reader.attrs["record"]


def with_run_feed(task: CorrelationParams, cls: type[luigi.Task]) -> luigi.Task:
    """The run's task of class `cls` (NeuronFamilies, or what requires it), reading the activation
    cache (its `from_cache`) when the run's correlations do."""
    return task.clone(cls, from_cache=correlations_of(task).feed[0])


class SelectUniversal(RunParams, ResultTask):
    """universal_neurons.csv: excess scores and statistics of the selected neurons."""

    def requires(self):
        return {"excess": self.clone(ExcessCorrelation), "stats": self.clone(NeuronStats)}

    def output(self):
        return self.shared_target(self.results_dir() / "universal_neurons.csv")

    def write(self):
        excess = pd.read_csv(self.input()["excess"]["excess"].path)
        stats = pd.read_csv(self.input()["stats"].path)
        universal = UniversalNeuronAnalyzer(excess).identify_universal_neurons(self.effective_threshold, self.top_k)
        merged = universal.merge(stats, on=["layer", "neuron"], how="left")
        # the split-half columns go last, so the columns this file had before keep their places
        write_csv(merged[[c for c in merged.columns if c not in SPLIT_HALF_COLUMNS] + SPLIT_HALF_COLUMNS],
                  self.output().path)


class Plots(RunParams, ResultTask):
    """The run's figures."""

    NAMES = ("excess_correlation_distribution", "universal_neurons_by_layer", "excess_correlation_vs_properties",
             "max_correlation_vs_baseline", "neuron_families")

    def requires(self):
        return {"excess": self.clone(ExcessCorrelation), "stats": self.clone(NeuronStats),
                "universal": self.clone(SelectUniversal), "families": with_run_feed(self, NeuronFamilies)}

    def output(self):
        return {name: self.shared_target(self.results_dir() / "plots" / f"{name}.png") for name in self.NAMES}

    def write(self):
        excess = pd.read_csv(self.input()["excess"]["excess"].path)
        stats = pd.read_csv(self.input()["stats"].path)
        universal = pd.read_csv(self.input()["universal"].path)
        # With top_k the effective cut is the k-th score, so the plots mark that.
        cut = universal["excess_correlation"].min() if self.top_k and len(universal) else self.effective_threshold
        title = f"({self.model_set.name}, {self.results_dir().name})"
        viz = UniversalNeuronVisualizer(excess, stats, float(cut), title)
        out = self.output()
        viz.excess_distribution(out["excess_correlation_distribution"].path)
        viz.universal_by_layer(out["universal_neurons_by_layer"].path, universal)
        viz.excess_vs_properties(out["excess_correlation_vs_properties"].path)
        corr_vs_baseline(excess, float(cut), out["max_correlation_vs_baseline"].path, title)
        families = pd.read_csv(self.input()["families"]["families.csv"].path)
        family_shares_plot(family_counts(families, universal), out["neuron_families"].path, title)


def correlation_timings(attrs: dict) -> dict:
    """run.json's record of where the correlation's time went: per pass (block) and the share
    of drawing Haar rotations (None for correlations from before it was recorded)."""
    passes = json.loads(attrs.get("pass_timings", "[]"))
    rotation = [p["rotation_seconds"] for p in passes]
    total = sum(p["seconds"] for p in passes)
    share = None if not passes or None in rotation or total <= 0 else round(sum(rotation) / total, 4)
    return {"correlation_passes": passes, "rotation_share": share}


class UniversalNeuronsAnalysis(RunParams, ResultTask):
    """Root of one analysis run; writes run.json (parameters, provenance, layer summary,
    split-half stability of the universal set) and shows the run's shared tables (excess
    scores, pairwise correlations, neuron statistics) in its results folder."""

    def requires(self):
        # the correlations' and the token file's records go into run.json: required, so that
        # one found damaged (and set aside) is rebuilt rather than read
        # with TOP_K no ablation runs, so no held-out tokens are made
        held_out = {} if self.top_k is not None else {"held_out": held_out_tokens(self)}
        return {"excess": self.clone(ExcessCorrelation), "universal": self.clone(SelectUniversal),
                "plots": self.clone(Plots), "stats": self.clone(NeuronStats), "correlations": correlations_of(self),
                "tokens": self.clone(TokenizeDataset), "families": with_run_feed(self, NeuronFamilies), **held_out}

    def output(self):
        d = self.results_dir()
        return {"run": self.result_target(self.run_dir() / "run.json"),
                **{name: self.shared_target(d / name) for name in SHARED_TABLES + (CONTRASTS, FAMILY_COUNTS)}}

    def write(self):
        tables = self.input()
        sources = (tables["excess"]["excess"], tables["excess"]["pairwise"], tables["stats"],
                   *(tables["families"][name] for name in NeuronFamilies.TABLES))
        # these files are shared with runs of other ablation settings: left as they are (their
        # seals too) unless what they show was rebuilt since
        for name, source in zip(SHARED_TABLES, sources):
            target = self.output()[name].path
            if not os.path.exists(target) or not os.path.samefile(source.path, target):
                link_file(source.path, target)
        excess = pd.read_csv(self.input()["excess"]["excess"].path)
        universal = pd.read_csv(self.input()["universal"].path)
        stats = pd.read_csv(tables["stats"].path)
        write_changed_csv(universal_vs_rest(stats, universal, excess), self.output()[CONTRASTS].path)
        counts = family_counts(pd.read_csv(tables["families"]["families.csv"].path), universal)
        write_changed_csv(counts, self.output()[FAMILY_COUNTS].path)
        summary = UniversalNeuronAnalyzer(excess).layer_summary(universal)
        half_a, half_b = split_half_sets(excess, self.effective_threshold, self.top_k)
        jaccard = jaccard_index(half_a, half_b)
        correlation = LayerResult.attributes(self.input()["correlations"][(self.reference, 0)].path)
        token_file = token_file_record(self.input()["tokens"].path)
        ms = self.model_set
        write_json(self.output()["run"].path, {
            "model_set": ms.name, "models": [m.name for m in ms.models],
            "locations": [model_location(m, self.checkpoint) for m in ms.models],
            "reference": ms.models[self.reference].name, "checkpoint": self.checkpoint,
            "dataset": self.dataset, "dataset_id": dataset_id(self.dataset), "document_seed": DOCUMENT_SEED,
            "n_tokens": self.n_tokens, "ctx_len": self.ctx_len, "exclude_tokens": self.exclude_tokens,
            "exclude_ids": token_file["exclude_ids"], "positions": token_file["counts"],
            "n_documents": token_file["n_documents"],
            "rotations": self.rotations, "rotation_seed": self.rotation_seed,
            "threshold": self.effective_threshold, "top_k": self.top_k, "ablation": self.ablation,
            "ablation_tokens": self.ablation_n_tokens, "ablation_samples": self.ablation_samples,
            "ablation_documents": (token_file_record(self.input()["held_out"].path)["n_documents"]
                                   if "held_out" in self.input() else None),
            "ablation_control": self.ablation_control, "ablation_seed": self.ablation_seed, "device": self.device,
            "precision": {"mode": self.effective_precision, "chosen": "PRECISION" if self.precision else
                          f"the default on {torch.device(self.device).type} (fastest within {ERROR_BOUND:g} of float64)",
                          "documented_error": DOCUMENTED_ERROR[self.effective_precision]},
            "correlation_seconds": round(float(correlation["seconds"]), 2), "correlation_feed": correlation["feed"],
            "cache_bytes_read": int(correlation["cache_bytes_read"]),
            **correlation_timings(correlation),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "n_neurons": int(summary["n_neurons"].sum()), "n_universal": int(summary["n_universal"].sum()),
            "n_dead": int(summary["n_dead"].sum()) if "n_dead" in summary else None,
            "split_halves": {**json.loads(correlation["split_halves"]),
                             "half_rows": [int(n) for n in correlation["half_rows"]]},
            "n_universal_half_a": len(half_a),
            "n_universal_half_b": len(half_b), "split_half_jaccard": None if np.isnan(jaccard) else jaccard,
            "layers": summary.to_dict(orient="records"),
            "families": {**json.loads(h5_record(tables["families"][NeuronFamilies.MATRIX].path)),
                         "counts": counts[["family", "n_universal", "n_all", "p_holm"]].to_dict(orient="records")}})
