"""The correlation step, split along the engine's seams so that several workers, GPUs or
hosts share it: `CorrelationBlock` tasks each stream the activation caches (or, when they do
not fit the disk, the models run batch by batch) once for a group of the engine's units and
save their partial best matches; `Correlations` merges them, in plan order, into one target
per reference layer. The results are the same whatever the number of blocks (to float32
rounding: a reduction's order can follow the width of the tensor it reduces)."""
from __future__ import annotations

import functools
import json
import logging
import os
import time

import luigi

from tasks.activations import CacheActivations
from tasks.common import PipelineTask, TaskProgress, notes
from tasks.params import CorrelationParams
from tasks.targets import H5Target, made_from, store
from tasks.data import TokenizeDataset, dataset_id
from tasks.zoo import model_requirement
from unlib.activations import ActivationCache, cache_bytes, cached_chunks, choose_feed, run_models
from unlib.engine.engine import ExcessCorrelationEngine
from unlib.engine.layout import Unit
from unlib.engine.memory import ModelFeed, parse_bytes
from unlib.engine.results import DEAD_MATCH, PassResult, PassStats, collect, merge_partials
from unlib.model_loading import mlp_shape, model_footprint
from unlib.h5write import partial_path
from unlib.memory_check import peak_memory
from unlib.store import checkpoint_label, provenance, read_json, short_hash, write_json, write_once
from unlib.tokens import document_halves, halves_of, read_tokens

logger = logging.getLogger("luigi-interface")


class CorrelationTask(CorrelationParams, PipelineTask):
    """What the correlation tasks share: the references, the models' layer sizes, the plan,
    and the parameters that name their folder."""

    @property
    def references(self) -> list[int]:
        return list(range(len(self.model_set.models))) if self.all_references else [self.reference]

    @property
    def layer_sizes(self) -> list[list[int]]:
        return [[d] * n for n, d in (mlp_shape(m, self.checkpoint) for m in self.model_set.models)]

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

    def engine(self) -> ExcessCorrelationEngine:
        """The engine, planned for CORR_MEMORY (build_analyses resolves its default once; planning
        touches no device) and for the feed (the models' weights and forward passes count
        without caches)."""
        feed = None if self.feed[0] else ModelFeed(tuple(model_footprint(m, self.checkpoint)
                                                         for m in self.model_set.models), self.ctx_len)
        return ExcessCorrelationEngine(self.layer_sizes, self.references, self.rotations, self.rotation_seed,
                                       self.device, parse_bytes(self.corr_memory), feed=feed, n_tokens=self.n_tokens,
                                       precision=self.effective_precision)

    def run_params(self) -> dict:
        """The parameters that name the correlation folder (inputs' content is checked, not named)."""
        return {"models": [m.model_id for m in self.model_set.models], "checkpoint": self.checkpoint,
                "dataset": dataset_id(self.dataset), "n_tokens": self.n_tokens, "ctx_len": self.ctx_len,
                "exclude_tokens": self.exclude_tokens, "rotations": self.rotations, "rotation_seed": self.rotation_seed,
                **self.correlation_method()}

    def run_key(self) -> str:
        return f"{self.model_set.name}_{checkpoint_label(self.checkpoint)}_{short_hash(self.run_params())}"


def pass_timing(units: str, attrs: dict) -> dict:
    """Where a block's time and memory went (blocks from before these were recorded: None):
    streaming, the result step, and of that the Haar rotations it drew (how many, in
    seconds); its planned and measured peak memory (-1: not measured here)."""
    return {"units": units, "seconds": round(float(attrs["seconds"]), 3),
            **{key: (None if key not in attrs else round(float(attrs[key]), 3) if key.endswith("seconds")
                     else int(attrs[key]))
               for key in ("stream_seconds", "reduce_seconds", "rotation_seconds", "rotations_drawn", "planned_bytes",
                           "peak_bytes")}}


def units_text(units: list[Unit]) -> str:
    """A group of units as a parameter: `row:first-last:col` per unit, comma-separated."""
    return ",".join(f"{u.row_model}:{u.row_layers[0]}-{u.row_layers[-1]}:{u.col_model}" for u in units)


def parse_units(text: str) -> list[Unit]:
    units = []
    for item in text.split(","):
        row, layers, col = item.split(":")
        first, last = map(int, layers.split("-"))
        units.append(Unit(int(row), tuple(range(first, last + 1)), int(col)))
    return units


def correlations_of(task: CorrelationParams) -> "Correlations":
    """The correlation task a run reads. With all_references, every reference's run shares one
    task (reference 0 names it), so the pass over the tokens happens once."""
    return task.clone(Correlations, reference=0) if task.all_references else task.clone(Correlations)


class CorrelationBlock(CorrelationTask):
    """One pass over the tokens for a group of the engine's units (model pairs x blocks of
    row layers): the partial max and rotated-baseline correlations of the references' neurons."""

    units = luigi.Parameter(description="the group's units, row:first-last:col, comma-separated")

    def requires(self):
        """The token file (the documents the halves are made of), then the activation caches,
        or the models to run."""
        if self.feed[0]:
            return [self.clone(TokenizeDataset)] + [self.clone(CacheActivations, model=i)
                                                    for i in range(len(self.model_set.models))]
        return [self.clone(TokenizeDataset)] + [t for m in self.model_set.models for t in model_requirement(m)]

    def output(self):
        path = store().correlation_block(self.run_key(), "-".join(map(str, self.references)), self.units)
        return H5Target(path, {**self.run_params(), "references": self.references, "units": self.units,
                               "inputs": self.inputs()})

    def run(self):
        use_cache, why = self.feed
        inputs = made_from(self)
        models = self.model_set.models
        units = parse_units(self.units)
        engine = self.engine()
        needed = engine.layout.needed_layers(units)
        if use_cache:
            split = halves_of(self.input()[0].path)
            caches = [ActivationCache(t.path) for t in self.input()[1:]]
            n_tokens = caches[0].n_tokens
            chunks = lambda needed: cached_chunks(caches, engine.chunk_tokens, self.device, needed)  # noqa: E731
            read = sum(4 * c.n_tokens * c.d_mlp * len(layers) for c, layers in zip(caches, needed))
        else:
            tokens, keep = read_tokens(self.input()[0].path)
            split = document_halves(tokens, keep)
            n_tokens = int(keep.sum())
            chunks = functools.partial(run_models, models, self.checkpoint, tokens, keep,
                                       engine.feed.sequences(engine.chunk_tokens), self.device)
            read = 0
        path = "activation caches" if use_cache else "models run batch by batch (no cache)"
        notes.info("correlation block %s: %s, because %s", self.units, path, why)
        start = time.monotonic()
        with TaskProgress(self, f"correlate {self.units} ({path})", n_tokens) as progress:
            def report(stats: PassStats) -> None:
                rate = stats.flops / max(time.monotonic() - start, 1e-9) / 1e9
                progress(stats.tokens, extra=f", {rate:,.1f} GFLOP/s")
            if not use_cache:  # the loader's library imported first: the measurement counts the pass, not the import
                import transformer_lens.model_bridge  # noqa: F401
            # the measured peak, against the plan's, as the allocator runs (live=False: tuning it costs time)
            result, peak = peak_memory(lambda: engine.run_pass(chunks, units, report, split), self.device, live=False)
        seconds, flops = time.monotonic() - start, result.stats.flops
        notes.info("correlation block %s: %d tokens in %.1f s: %.0f tokens/s, %.1f GFLOP/s", self.units,
                       n_tokens, seconds, n_tokens / seconds, flops / seconds / 1e9)
        result.save(self.output().path, {
            "provenance": self.output().expected, "made_from": inputs, "n_tokens": n_tokens, "feed": path, "feed_reason": why,
            "seconds": seconds, "flops": flops, "cache_bytes_read": read, "device": str(self.device),
            "precision": engine.precision, "stream_seconds": result.stats.stream_seconds, "reduce_seconds": result.stats.reduce_seconds,
            "rotation_seconds": result.stats.rotation_seconds, "rotations_drawn": len(engine.rotation_sizes(units)),
            "planned_bytes": engine.pass_bytes(units), "peak_bytes": -1 if peak is None else peak,
            "split_halves": json.dumps(split.record())})


class Correlations(CorrelationTask):
    """For each neuron of the reference model (of every model with all_references), per
    other model: max correlation, where it is, and the max against each rotated baseline;
    merged from the blocks, `parallel` or as many as the memory plan needs passes."""

    def blocks(self) -> list[CorrelationBlock]:
        return [self.clone(CorrelationBlock, units=units) for units in self.planned_groups()]

    def plan_path(self):
        return store().correlation_plan(self.run_key(), "-".join(map(str, self.references)))

    def fresh_plan(self) -> dict:
        engine = self.engine()
        return {"groups": [units_text(g) for g in engine.groups(self.parallel)], "corr_memory": engine.memory_budget,
                "parallel": self.parallel}

    def recorded_groups(self) -> list[str] | None:
        """The blocks recorded for this correlation (record_plan), or None: none recorded, or
        a CORR_MEMORY given explicitly cannot hold one of them (then it is planned anew)."""
        try:
            groups = read_json(self.plan_path())["groups"]
            engine = self.engine()
            fits = max(engine.pass_bytes(parse_units(g)) for g in groups) <= engine.memory_budget
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable (a crash while written)
            return None
        return groups if fits or not self.corr_memory_given else None

    def planned_groups(self) -> list[str]:
        """The blocks (their units) this correlation is split into: the recorded ones where
        there are, so that every process (a resume with other WORKERS, PARALLEL or free
        memory, another process or host on the same store) runs the same blocks, no finished
        block is orphaned and one task id never stands for two sets of blocks."""
        return self.recorded_groups() or self.fresh_plan()["groups"]

    def record_plan(self) -> None:
        """Decide the blocks once: record this process's plan unless one is recorded (another
        process's, written first, is kept). Only a CORR_MEMORY given explicitly that cannot
        hold a recorded block plans anew (said in one line; a finished block whose units the
        new plan has again is kept, since blocks are files named by their units). Called by
        run_analysis once the token files are there, so a refused run leaves no plan."""
        if self.recorded_groups() is not None:
            return
        if self.plan_path().exists():
            logger.warning("CORR_MEMORY=%s cannot hold the blocks recorded for this correlation: planning them "
                           "anew (a finished block of the same units is kept)", self.corr_memory)
            write_json(self.plan_path(), self.fresh_plan())
        else:
            write_once(self.plan_path(), self.fresh_plan())

    def requires(self):
        return self.blocks()

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
        inputs = made_from(self)
        best: dict = {}
        attrs = []
        for target in self.input():  # in plan order: ties go to the earlier match, as in one engine
            result = PassResult.load(target.path)
            merge_partials(best, result.entries)
            attrs.append(result.attrs)
        seconds = sum(a["seconds"] for a in attrs)
        gflops = sum(a["flops"] for a in attrs) / max(seconds, 1e-9) / 1e9
        self.set_status_message(f"merged {len(attrs)} block(s): {seconds:.1f} s, {gflops:,.1f} GFLOP/s")
        targets = self.output()
        names = [m.name for m in self.model_set.models]
        for ref, layers in collect(best, self.layer_sizes, self.references, result.half_rows).items():
            for layer in layers:
                layer.save(targets[(ref, layer.layer)].path, {
                    "provenance": provenance(self.layer_provenance(ref, layer.layer)), "made_from": inputs,
                    "reference": names[ref], "others": [names[m] for m in layer.others],
                    "n_tokens": attrs[0]["n_tokens"], "rotations": self.rotations, "rotation_seed": self.rotation_seed,
                    "feed": attrs[0]["feed"], "feed_reason": attrs[0]["feed_reason"], "seconds": seconds,
                    "gflops": gflops, "device": str(self.device), "precision": self.effective_precision,
                    "passes": len(attrs), "split_halves": attrs[0]["split_halves"],
                    "cache_bytes_read": sum(int(a["cache_bytes_read"]) for a in attrs),
                    "pass_timings": json.dumps([pass_timing(b.units, a) for b, a in zip(self.requires(), attrs)])})
