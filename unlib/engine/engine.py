"""The engine: a planned correlation (WorkPlan) that runs its passes over the tokens."""
from __future__ import annotations

import time
from typing import Callable

import torch

from unlib.engine.comoments import Feed, stream
from unlib.engine.halves import BLOCKS, HalfSplit
from unlib.engine.layout import Unit
from unlib.engine.memory import ModelFeed
from unlib.engine.planning import WorkPlan
from unlib.engine.precision import self_check
from unlib.engine.reduction import reduce_pass
from unlib.engine.results import LayerResult, PassResult, PassStats, combine
from unlib.engine.rotations import layer_rotations


class ExcessCorrelationEngine(WorkPlan):
    """Max and rotated-baseline correlations of the neurons of each reference model
    against every other model, from activations streamed in token chunks, on all rows
    and on each half of them (whole documents when a HalfSplit of them is given, else
    alternating blocks of HALF_BLOCK_ROWS rows).

    Planning: see WorkPlan. Each pass (`run_pass`) takes the statistics of the layers it reads
    itself and keeps them in values of its own, never on the engine, so passes are independent
    (also run at once on one engine) and `merge_partials` + `collect` combine them, in plan
    order, into exactly the one-engine result. Feeding: `run(chunks)` calls `chunks(needed)`
    once per pass; it must yield chunk[model] -> (tokens, all of the model's neurons, layer
    after layer) float32 tensors on the engine's device, or None for a model with no layer in
    needed[model]; the columns of layers not in needed[model] are ignored. The engine never
    writes to them.
    """

    def __init__(self, layer_sizes: list[list[int]], references: list[int] | int = 0, n_rotations: int = 5,
                 rotation_seed: int = 0, device: str | torch.device = "cpu", memory_budget: int | None = None,
                 chunk_tokens: int | None = None, feed: ModelFeed | None = None, n_tokens: int | None = None,
                 precision: str = "fp32"):
        super().__init__(layer_sizes, references, n_rotations, device, memory_budget, chunk_tokens, feed, n_tokens,
                         precision)
        self.rotation_seed = rotation_seed

    def run(self, chunks: Feed, progress: Callable[[PassStats], None] | None = None,
            split: HalfSplit = BLOCKS) -> dict[int, list[LayerResult]]:
        """All passes; returns {reference model: [LayerResult per layer]}."""
        return combine((self.run_pass(chunks, units, progress, split) for units in self.passes), self.layer_sizes,
                       self.references)

    def run_pass(self, chunks: Feed, units: list[Unit], progress: Callable[[PassStats], None] | None = None,
                 split: HalfSplit = BLOCKS) -> PassResult:
        """One pass over the tokens for `units`, with the statistics of every layer it reads
        (within-layer co-moments, means, constant neurons) taken in the same pass: its
        partial best matches, which merge_partials combines with other passes' exactly, and
        its cost. `split`: which half each row is in. `progress(stats)` follows each chunk."""
        stats = PassStats()
        self_check(self.products)
        start = time.perf_counter()
        moments = stream(self.layout, chunks, units, self.products, stats, progress, split)
        middle = time.perf_counter()
        entries = reduce_pass(moments, units, self.n_rotations, self.rotation_seed, stats)
        stats.stream_seconds = middle - start
        stats.reduce_seconds = time.perf_counter() - middle
        for (ref, layer, _), entry in entries.items():
            entry["dead"] = moments.dead(ref, layer)
        return PassResult(entries, list(moments.counts), stats=stats)

    def rotation(self, model: int, layer: int, sample: int) -> torch.Tensor:
        """The recorded-seed rotation of `model`'s `layer` for baseline sample `sample`."""
        return next(layer_rotations(self.layer_sizes, self.rotation_seed, [(model, layer, sample)], self.device))[0]
