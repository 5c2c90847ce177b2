"""The correlation step: the engine over the activation caches (or, when they do not fit
the disk, over the models run batch by batch), writing one target per reference layer."""
from __future__ import annotations

import functools
import logging
import os
import time

from tasks.activations import CacheActivations
from tasks.common import CorrelationParams, H5Target, PipelineTask, TaskProgress, store
from tasks.data import TokenizeDataset, dataset_id
from tasks.zoo import model_requirement
from unlib.activations import ActivationCache, cache_bytes, cached_chunks, choose_feed, model_chunks
from unlib.correlation import DEAD_MATCH, HALF_BLOCK_ROWS, ExcessCorrelationEngine, parse_bytes
from unlib.data import read_tokens
from unlib.models import load_model, mlp_shape
from unlib.store import checkpoint_label, partial_path, provenance, short_hash

logger = logging.getLogger("luigi-interface")
CHUNK_TOKENS = 4096


class Correlations(CorrelationParams, PipelineTask):
    """For each neuron of the reference model (of every model with all_references), per
    other model: max correlation, where it is, and the max against each rotated baseline."""

    @property
    def references(self) -> list[int]:
        return list(range(len(self.model_set.models))) if self.all_references else [self.reference]

    @functools.cached_property
    def feed(self) -> tuple[bool, str]:
        """(read activation caches?, why), decided once per task. Caches already written,
        fully or in part, count as room they already have."""
        if self.cache == "0":
            return choose_feed("0", 0, 0)
        caches = [self.clone(CacheActivations, model=i).output().path for i in range(len(self.model_set.models))]
        missing = [m for m, path in zip(self.model_set.models, caches) if not os.path.exists(path)]
        if not missing:
            return True, "the activation caches exist"
        partial = sum(p.stat().st_size for p in map(partial_path, caches) if p.exists())
        needed = cache_bytes(self.n_tokens, [mlp_shape(m, self.checkpoint) for m in missing]) - partial
        return choose_feed(self.cache, needed, store().free_disk()[1])

    def requires(self):
        if self.feed[0]:
            return [self.clone(CacheActivations, model=i) for i in range(len(self.model_set.models))]
        return [self.clone(TokenizeDataset)] + [t for m in self.model_set.models for t in model_requirement(m)]

    def run_params(self) -> dict:
        """The parameters that name the correlation folder (inputs' content is checked, not named)."""
        return {"models": [m.model_id for m in self.model_set.models], "checkpoint": self.checkpoint,
                "dataset": dataset_id(self.dataset), "n_tokens": self.n_tokens, "ctx_len": self.ctx_len,
                "exclude_tokens": self.exclude_tokens, "rotations": self.rotations, "rotation_seed": self.rotation_seed,
                "half_block_rows": HALF_BLOCK_ROWS}

    def run_key(self) -> str:
        return f"{self.model_set.name}_{checkpoint_label(self.checkpoint)}_{short_hash(self.run_params())}"

    def layer_provenance(self, ref: int, layer: int) -> dict:
        # dead_match: how a dead reference neuron's best match is recorded; files from before it
        # (which claimed neuron 0 of layer 0) are refused and rebuilt
        return {**self.run_params(), "reference": ref, "layer": layer, "dead_match": DEAD_MATCH, "inputs": self.inputs()}

    def output(self):
        models = self.model_set.models
        return {(ref, layer): H5Target(store().correlation(self.run_key(), models[ref].model_id, layer),
                                       self.layer_provenance(ref, layer))
                for ref in self.references for layer in range(mlp_shape(models[ref], self.checkpoint)[0])}

    def run(self):
        use_cache, why = self.feed
        models = self.model_set.models
        targets = self.output()
        sizes = [[d] * n for n, d in (mlp_shape(m, self.checkpoint) for m in models)]
        if not use_cache:  # models first, so the engine's budget is what they leave free
            loaded = [load_model(m, self.checkpoint, self.device) for m in models]
        budget = parse_bytes(self.memory) if self.memory else None
        engine = ExcessCorrelationEngine(sizes, self.references, self.rotations, self.rotation_seed, self.device,
                                         budget, CHUNK_TOKENS)
        if use_cache:
            caches = [ActivationCache(t.path) for t in self.input()]
            n_tokens = caches[0].n_tokens
            chunks = lambda needed: cached_chunks(caches, CHUNK_TOKENS, self.device, needed)  # noqa: E731
        else:
            tokens, keep = read_tokens(self.input()[0].path)
            n_tokens = int(keep.sum())
            chunks = lambda needed: model_chunks(loaded, tokens, keep, self.batch_size, self.device)  # noqa: E731
        path = "activation caches" if use_cache else "models run batch by batch (no cache)"
        plan = f"{len(engine.passes)} pass(es), {sum(map(len, engine.passes))} accumulators"
        logger.warning("correlation feed: %s, because %s; plan: %s", path, why, plan)
        start = time.monotonic()
        total = n_tokens * len(engine.passes)
        with TaskProgress(self, f"correlate ({path})", total) as progress:
            def report(streamed: int, eng: ExcessCorrelationEngine) -> None:
                rate = eng.flops / max(time.monotonic() - start, 1e-9) / 1e9
                progress(streamed, extra=f", {rate:,.1f} GFLOP/s")
            results = engine.run(chunks, report)
        seconds = time.monotonic() - start
        logger.warning("correlation: %d tokens x %d pass(es) in %.1f s: %.0f tokens/s, %.1f GFLOP/s",
                       n_tokens, len(engine.passes), seconds, total / seconds, engine.flops / seconds / 1e9)
        names = [m.name for m in models]
        for ref, layers in results.items():
            for result in layers:
                result.save(targets[(ref, result.layer)].path, {
                    "provenance": provenance(self.layer_provenance(ref, result.layer)),
                    "reference": names[ref], "others": [names[m] for m in result.others],
                    "n_tokens": n_tokens, "rotations": self.rotations, "rotation_seed": self.rotation_seed,
                    "feed": path, "feed_reason": why, "seconds": seconds, "gflops": engine.flops / seconds / 1e9,
                    "device": str(self.device), "passes": len(engine.passes), "half_rows": engine.half_rows})
