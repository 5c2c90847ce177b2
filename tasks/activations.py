"""Activation caches, one per (model, checkpoint, token file)."""
from __future__ import annotations

from pathlib import Path

import luigi

from tasks.common import PipelineTask, TaskProgress
from tasks.params import CheckpointParams
from tasks.targets import H5Target, made_from, store
from tasks.data import TokenizeDataset
from tasks.zoo import model_requirement
from unlib.activations import CACHE_DTYPE, cache_activations
from unlib.checkpoints import model_location
from unlib.model_loading import load_model
from unlib.tokens import read_tokens


class CacheActivations(CheckpointParams, PipelineTask):
    """MLP post-activations of model number `model` of the set over the analysis tokens."""

    model = luigi.IntParameter(description="index of the model in the set")

    @property
    def spec(self):
        return self.model_set.models[self.model]

    def requires(self):
        return {"tokens": self.clone(TokenizeDataset), "model": model_requirement(self.spec)}

    def tokens_file(self) -> Path:
        return Path(self.clone(TokenizeDataset).output().path)

    def cache_attrs(self) -> dict:
        """What the cache was made from, in normalised names (however the user spelled the
        model's path or the store's); recorded in it and checked before it is reused."""
        _, revision = model_location(self.spec, self.checkpoint)
        tokens = self.tokens_file()
        return {"model": self.spec.model_id, "revision": revision or "",
                "checkpoint": -1 if self.checkpoint is None else self.checkpoint,
                "tokens_file": f"{tokens.parent.name}/{tokens.name}", "hook": "blocks.<layer>.mlp.hook_post",
                "dtype": CACHE_DTYPE,
                "inputs": {**self.token_inputs(), **self.model_inputs([self.model])}}

    def output(self):
        return H5Target(store().activations(self.spec.model_id, self.checkpoint, self.tokens_file()),
                        self.cache_attrs())

    def run(self):
        inputs = made_from(self)  # before reading them: a digest never vouches for content read earlier
        tokens, keep = read_tokens(self.input()["tokens"].path)
        model = load_model(self.spec, self.checkpoint, self.device)
        with TaskProgress(self, f"cache {self.spec.name}", int(keep.sum())) as progress:
            cache_activations(model, tokens, keep, self.output().path, self.cache_attrs(), self.batch_size,
                              progress=progress, made_from=inputs)
