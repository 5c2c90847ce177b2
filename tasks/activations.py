"""Activation caches, one per (model, checkpoint, token file)."""
from __future__ import annotations

from pathlib import Path

import luigi

from tasks.common import CheckpointParams, TaskProgress, store
from tasks.data import TokenizeDataset
from tasks.zoo import model_requirement
from unlib.activations import cache_activations
from unlib.data import read_tokens
from unlib.models import load_model, model_location


class CacheActivations(CheckpointParams, luigi.Task):
    """MLP post-activations of model number `model` of the set over the analysis tokens."""

    model = luigi.IntParameter(description="index of the model in the set")

    @property
    def spec(self):
        return self.model_set.models[self.model]

    def requires(self):
        return {"tokens": self.clone(TokenizeDataset), "model": model_requirement(self.spec)}

    def output(self):
        tokens_file = Path(self.clone(TokenizeDataset).output().path)
        return luigi.LocalTarget(store().activations(self.spec.model_id, self.checkpoint, tokens_file))

    def run(self):
        tokens = read_tokens(self.input()["tokens"].path)
        model = load_model(self.spec, self.checkpoint, self.device)
        location, revision = model_location(self.spec, self.checkpoint)
        attrs = {"model": self.spec.name, "location": location, "revision": revision or "",
                 "checkpoint": -1 if self.checkpoint is None else self.checkpoint,
                 "tokens_file": self.input()["tokens"].path, "hook": "blocks.<layer>.mlp.hook_post"}
        n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
        with TaskProgress(self, f"cache {self.spec.name}", n_tokens) as progress:
            cache_activations(model, tokens, self.output().path, attrs, progress=progress)
