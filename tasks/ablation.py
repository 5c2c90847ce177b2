"""Functional impact of the universal neurons: the reference model with them ablated, against
matched random neurons, on held-out tokens."""
from __future__ import annotations

import pandas as pd
import torch

from tasks.analysis import NeuronStats, SelectUniversal, write_csv
from tasks.common import ResultTask, TaskProgress
from tasks.params import RunParams
from tasks.data import TokenizeDataset
from tasks.zoo import model_requirement
from unlib import plots
from unlib.ablation import ablation_metrics, ablation_sets, ablation_summary, ablation_table, neuron_list
from unlib.model_loading import load_model, mlp_shape
from unlib.tokens import read_tokens


class Ablation(RunParams, ResultTask):
    """ablation.csv, ablation_summary.csv and plots/ablation_impact.png: the reference model's
    loss, KL and top-1 agreement on held-out tokens with the universal set ablated (all of it,
    and layer by layer) and with ABLATION_SAMPLES random sets matched to it per layer."""

    def held_out_tokens(self) -> TokenizeDataset:
        """ABLATION_TOKENS tokens that follow the analysed ones in the document stream."""
        return self.clone(TokenizeDataset, n_tokens=self.ablation_n_tokens, skip_tokens=self.n_tokens)

    def requires(self):
        return {"universal": self.clone(SelectUniversal), "stats": self.clone(NeuronStats),
                "tokens": self.held_out_tokens(), "model": model_requirement(self.model_set.models[self.reference])}

    def output(self):
        d = self.run_dir()
        return {"table": self.result_target(d / "ablation.csv"), "summary": self.result_target(d / "ablation_summary.csv"),
                "plot": self.result_target(d / "plots" / "ablation_impact.png")}

    def write(self):
        spec = self.model_set.models[self.reference]
        _, d_mlp = mlp_shape(spec, self.checkpoint)
        universal = neuron_list(pd.read_csv(self.input()["universal"].path))
        sets = ablation_sets(universal, d_mlp, self.ablation_samples, self.ablation_seed)
        means = None
        if self.ablation == "mean":  # from the statistics pass over the analysed tokens: no pass of its own
            stats = pd.read_csv(self.input()["stats"].path).sort_values(["layer", "neuron"])
            means = torch.tensor(stats["post_mean"].to_numpy().reshape(-1, d_mlp))
        tokens, keep = read_tokens(self.input()["tokens"].path)
        model = load_model(spec, self.checkpoint, self.device)
        distinct = len({tuple(s) for s in sets.values()})
        with TaskProgress(self, f"ablate {distinct} neuron sets ({self.ablation})", int(keep[:, 1:].sum())) as progress:
            base, results = ablation_metrics(model, tokens, keep, sets, means, self.batch_size, progress)
        table = ablation_table(base, results)
        summary = ablation_summary(table)
        out = self.output()
        write_csv(table, out["table"].path)
        write_csv(summary, out["summary"].path)
        plots.ablation_impact_plot(table, summary, out["plot"].path,
                                   f"({self.model_set.name}, {self.run_name()}, {self.ablation} ablation)")
