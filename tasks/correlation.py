"""The correlation step: one pass over the activation caches of all models, writing one
target per reference layer."""
from __future__ import annotations

import time

import luigi

from tasks.activations import CacheActivations
from tasks.common import CorrelationParams, TaskProgress, store
from unlib.activations import ActivationCache, cached_chunks
from unlib.correlation import run_engine
from unlib.models import n_layers
from unlib.store import checkpoint_label, short_hash

CHUNK_TOKENS = 8192


class Correlations(CorrelationParams, luigi.Task):
    """For each neuron of the reference model, per other model: max correlation, where it
    is, and the max correlation against each rotated baseline."""

    def requires(self):
        return [self.clone(CacheActivations, model=i) for i in range(len(self.model_set.models))]

    def run_key(self) -> str:
        ms = self.model_set
        key = {"models": [m.model_id for m in ms.models], "checkpoint": self.checkpoint,
               "dataset": self.dataset, "n_tokens": self.n_tokens, "ctx_len": self.ctx_len,
               "rotations": self.rotations, "rotation_seed": self.rotation_seed}
        return f"{ms.name}_{checkpoint_label(self.checkpoint)}_{short_hash(key)}"

    def output(self):
        ref = self.model_set.models[self.reference]
        return [luigi.LocalTarget(store().correlation(self.run_key(), ref.model_id, layer))
                for layer in range(n_layers(ref, self.checkpoint))]

    def run(self):
        caches = [ActivationCache(t.path) for t in self.input()]
        sizes = [[c.d_mlp] * c.n_layers for c in caches]
        names = [m.name for m in self.model_set.models]
        start = time.monotonic()
        with TaskProgress(self, "correlate", caches[0].n_tokens) as progress:
            results = run_engine(cached_chunks(caches, CHUNK_TOKENS, self.device), sizes, self.reference,
                                 self.rotations, self.rotation_seed, self.device, progress=progress)
        seconds = time.monotonic() - start
        for result, target in zip(results, self.output()):
            result.save(target.path, {"reference": names[self.reference],
                                       "others": [names[m] for m in result.others],
                                       "n_tokens": caches[0].n_tokens, "rotations": self.rotations,
                                       "rotation_seed": self.rotation_seed, "seconds": seconds})
