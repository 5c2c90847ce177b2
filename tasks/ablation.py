"""Functional impact of the universal neurons: the reference model with them ablated, against
matched random neurons, on held-out tokens."""
from __future__ import annotations

from pathlib import Path

import luigi
import pandas as pd
import torch

from tasks.analysis import ExcessCorrelation, NeuronFamilies, NeuronStats, SelectUniversal, write_csv
from tasks.common import ResultTask, TaskProgress, logger
from tasks.params import HeldOutParams, RunParams
from tasks.targets import store
from tasks.data import held_out_tokens
from tasks.zoo import model_requirement
from unlib import plots
from unlib.ablation import (ablation_metrics, ablation_sets, ablation_summary, ablation_table, few_documents_warning,
                            frequency_deciles, neuron_list, neuron_table)
from unlib.interventions import causal_checks, first_tokens
from unlib.model_loading import load_model, mlp_shape
from unlib.store import checkpoint_label
from unlib.tokens import read_tokens, token_file_record


class Ablation(RunParams, ResultTask):
    """ablation.csv, ablation_summary.csv, ablation_neurons.csv and plots/ablation_impact.png:
    the reference model's loss, KL and top-1 agreement on held-out tokens with the universal set
    ablated (all of it, layer by layer, and neuron by neuron) and with ABLATION_SAMPLES random
    sets matched to it per layer (and, with ABLATION_CONTROL=matched, on activation frequency)."""

    def requires(self):
        return {"universal": self.clone(SelectUniversal), "stats": self.clone(NeuronStats),
                "excess": self.clone(ExcessCorrelation), "tokens": held_out_tokens(self),
                "model": model_requirement(self.model_set.models[self.reference])}

    def output(self):
        d = self.run_dir()
        return {"table": self.result_target(d / "ablation.csv"), "summary": self.result_target(d / "ablation_summary.csv"),
                "neurons": self.result_target(d / "ablation_neurons.csv"),
                "plot": self.result_target(d / "plots" / "ablation_impact.png")}

    def write(self):
        spec = self.model_set.models[self.reference]
        _, d_mlp = mlp_shape(spec, self.checkpoint)
        universal = neuron_list(pd.read_csv(self.input()["universal"].path))
        stats = pd.read_csv(self.input()["stats"].path).sort_values(["layer", "neuron"])
        deciles = None
        if self.ablation_control == "matched":
            dead = pd.read_csv(self.input()["excess"]["excess"].path).sort_values(["layer", "neuron"])["dead"]
            deciles = frequency_deciles(stats["sparsity"].to_numpy().reshape(-1, d_mlp),
                                        ~dead.to_numpy(dtype=bool).reshape(-1, d_mlp))
        sets = ablation_sets(universal, d_mlp, self.ablation_samples, self.ablation_seed, deciles)
        means = None
        if self.ablation == "mean":  # from the statistics pass over the analysed tokens: no pass of its own
            means = torch.tensor(stats["post_mean"].to_numpy().reshape(-1, d_mlp))
        tokens, keep = read_tokens(self.input()["tokens"].path)
        base, results = {}, {}
        if sets:  # nothing universal: no pass over the held-out tokens, empty tables
            record = token_file_record(self.input()["tokens"].path)
            if warning := few_documents_warning(self.ablation_n_tokens, record["n_documents"]):
                logger.warning("%s", warning)
            model = load_model(spec, self.checkpoint, self.device)
            distinct = len({tuple(s) for s in sets.values()})
            with TaskProgress(self, f"ablate {distinct} neuron sets ({self.ablation})",
                              int(keep[:, 1:].sum())) as progress:
                base, results = ablation_metrics(model, tokens, keep, sets, means, self.batch_size, progress)
        table = ablation_table(base, results)
        summary = ablation_summary(table)
        out = self.output()
        write_csv(table, out["table"].path)
        write_csv(summary, out["summary"].path)
        write_csv(neuron_table(results), out["neurons"].path)
        plots.ablation_impact_plot(table, summary, out["plot"].path,
                                   f"({self.model_set.name}, {self.run_name()}, {self.ablation} ablation)")


class Interventions(HeldOutParams, ResultTask):
    """interventions.csv, interventions_summary.csv and interventions.png: the paper's causal
    checks on the held-out tokens, kept per model, checkpoint, held-out file and ABLATION_SEED
    (shared by every run on them). The top entropy and attention-deactivation candidates of
    neuron_roles.csv, and random neurons of their layers (seeded by ABLATION_SEED), have their
    activation fixed to each value of a sweep; loss, entropy, final LayerNorm scale and the BOS
    attention of the candidates' heads are recorded."""

    reference = luigi.IntParameter(default=0, description="index of the model in the set")
    from_cache = luigi.BoolParameter(default=False, significant=False, description="the families read the cache")
    FILES = ("interventions.csv", "interventions_summary.csv", "interventions.png")

    def requires(self):
        return {"families": self.clone(NeuronFamilies), "tokens": held_out_tokens(self),
                "model": model_requirement(self.model_set.models[self.reference])}

    def inputs(self) -> dict[str, str]:
        return self.clone(NeuronFamilies).inputs()

    def output(self):
        spec = self.model_set.models[self.reference]
        folder = store().interventions(spec.model_id, self.checkpoint, Path(held_out_tokens(self).output().path),
                                       self.ablation_seed)
        return {name: self.result_target(folder / name, ignore=("reference",)) for name in self.FILES}

    def write(self):
        spec = self.model_set.models[self.reference]
        roles = pd.read_csv(self.input()["families"]["neuron_roles.csv"].path)
        tokens, keep = read_tokens(self.input()["tokens"].path)
        model = load_model(spec, self.checkpoint, self.device)
        swept = 2 * int(first_tokens(tokens, keep)[1].sum())  # two sweeps over the first held-out tokens
        with TaskProgress(self, "causal checks of entropy and deactivation candidates", swept) as progress:
            sweep, summary = causal_checks(model, tokens, keep, roles, self.ablation_seed, self.batch_size, progress)
        out = self.output()
        write_csv(sweep, out["interventions.csv"].path)
        write_csv(summary, out["interventions_summary.csv"].path)
        plots.interventions_plot(sweep, summary, out["interventions.png"].path,
                                 f"({self.model_set.name}, {checkpoint_label(self.checkpoint)})")
