"""The correlation engine.

For every neuron of a reference model it finds, in each other model, the best-correlated
neuron (Pearson over the same tokens) and the best correlation after that model's
activations are rotated within each layer by Haar-random orthogonal matrices.

How it stays fast and exact (DESIGN.md section 3):
- activations arrive in token chunks; each chunk's centred cross-product is one GEMM,
  merged into the running co-moments with Chan's parallel update (no E[xy]-E[x]E[y]);
- rotations are applied after the stream: corr with rotated activations needs only
  C[:, layer] @ Q and the rotated variances diag(Q^T S Q), S being the other model's
  within-layer co-moment, so R rotations cost R small matmuls, not R passes.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterable

import h5py
import numpy as np
import pandas as pd
import torch

from unlib import UserError
from unlib.store import write_small_h5


def haar_orthogonal(n: int, seed: Iterable[int] | int) -> torch.Tensor:
    """A Haar-distributed n x n orthogonal matrix (QR of a Gaussian matrix with the signs
    of R's diagonal moved into Q), float64 on the CPU, reproducible from `seed`."""
    state = np.random.SeedSequence(seed).generate_state(2)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    gaussian = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))


def inverse_std(var: torch.Tensor) -> torch.Tensor:
    """1/sqrt(var), and 0 for a neuron that is constant over the tokens (its correlations
    are then 0 rather than NaN)."""
    return torch.where(var > 0, var.clamp_min(1e-30).rsqrt(), torch.zeros((), device=var.device))


def _corr(cov: torch.Tensor, inv_std_x: torch.Tensor, inv_std_y: torch.Tensor) -> torch.Tensor:
    """Correlations from co-moments: two in-place scalings, no temporaries."""
    return cov.mul(inv_std_x[:, None]).mul_(inv_std_y)


@dataclasses.dataclass
class LayerResult:
    """Correlations of one reference layer's neurons against each other model:
    arrays are indexed [other model, neuron] (baseline: [other model, rotation, neuron])."""

    layer: int
    others: list[int]
    max_corr: np.ndarray
    max_layer: np.ndarray
    max_neuron: np.ndarray
    baseline_max_corr: np.ndarray

    ARRAYS = ("max_corr", "max_layer", "max_neuron", "baseline_max_corr")

    def save(self, path, attrs: dict) -> None:
        """Write atomically to an HDF5 file, with `attrs` as provenance."""
        write_small_h5(path, {name: getattr(self, name) for name in self.ARRAYS},
                       {**attrs, "layer": self.layer, "other_index": self.others})

    @staticmethod
    def attributes(path) -> dict:
        """The provenance and timing attributes saved with a result."""
        with h5py.File(path, "r") as f:
            return dict(f.attrs)

    @classmethod
    def load(cls, path) -> "LayerResult":
        with h5py.File(path, "r") as f:
            return cls(layer=int(f.attrs["layer"]), others=[int(i) for i in f.attrs["other_index"]],
                       **{name: f[name][:] for name in cls.ARRAYS})


@dataclasses.dataclass(frozen=True)
class Unit:
    """One accumulator: the co-moment of a block of `row_model`'s layers with every layer
    of `col_model`. It serves both directions of the pair (symmetry)."""

    row_model: int
    row_layers: tuple[int, ...]
    col_model: int


class MemoryBudgetError(UserError):
    """CORR_MEMORY is too small for the smallest unit of work."""


def parse_bytes(text: str) -> int:
    """'8G', '512M', '1.5GB' or a plain number of bytes (at least one)."""
    value = text.strip().upper().removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(value[-1:], 1)
    number = float(value[:-1] if scale > 1 else value)
    if not math.isfinite(number) or number * scale < 1:
        raise ValueError(f"not a positive size: {text!r}")
    return int(number * scale)


def default_memory_budget(device: str | torch.device) -> int:
    """Bytes the engine may use: 80 % of a GPU's free memory, half the available RAM on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    import psutil

    return int(0.5 * psutil.virtual_memory().available)


class ExcessCorrelationEngine:
    """Max and rotated-baseline correlations of the neurons of each reference model
    against every other model, from activations streamed in token chunks.

    Planning: one accumulator per unordered model pair (split into blocks of the row
    model's layers when the memory budget demands), as many as fit the budget per pass
    over the tokens. Feeding: `run(chunks)` calls `chunks(needed)` once per pass; it must
    yield chunk[model] -> (tokens, all of the model's neurons, layer after layer) float32
    tensors on the engine's device, or None for a model with no layer in needed[model];
    the columns of layers not in needed[model] are ignored. The engine never writes to them.
    """

    BYTES = 4  # float32 accumulators

    def __init__(self, layer_sizes: list[list[int]], references: list[int] | int = 0, n_rotations: int = 5,
                 rotation_seed: int = 0, device: str | torch.device = "cpu", memory_budget: int | None = None,
                 chunk_tokens: int = 4096):
        self.layer_sizes = layer_sizes
        self.references = [references] if isinstance(references, int) else sorted(references)
        self.n_rotations = n_rotations
        self.rotation_seed = rotation_seed
        self.device = torch.device(device)
        self.memory_budget = memory_budget or default_memory_budget(self.device)
        self.chunk_tokens = chunk_tokens
        self.offsets = [np.concatenate([[0], np.cumsum(sizes)]).astype(int) for sizes in layer_sizes]
        self.passes = self.plan()
        self.flops = 0.0  # co-moment GEMM work streamed so far
        self.tokens_streamed = 0  # over all passes
        self.stream_seconds = 0.0  # time in passes over the tokens
        self.reduce_seconds = 0.0  # time turning co-moments into correlations (rotations included)
        self.rotation_seconds = 0.0  # of which drawing Haar rotations

    # ---- planning -------------------------------------------------------------------
    def pairs(self) -> list[tuple[int, int]]:
        """(row, col) per unordered pair involving a reference; rows are a reference."""
        out = []
        for a in range(len(self.layer_sizes)):
            for b in range(a + 1, len(self.layer_sizes)):
                if a in self.references:
                    out.append((a, b))
                elif b in self.references:
                    out.append((b, a))
        return out

    def fixed_bytes(self) -> int:
        """Memory the engine needs besides its accumulators: within-layer co-moments; five
        chunk-sized buffers (two read ahead, one being read, the chunk and its centred
        copy); and the result step's scratch (a correlation block and its max, a Haar
        rotation drawn in float64)."""
        within = sum(d * d for sizes in self.layer_sizes for d in sizes)
        width = sum(sum(sizes) for sizes in self.layer_sizes)
        d_max = max(max(s) for s in self.layer_sizes)
        scratch = 3 * d_max * max(sum(s) for s in self.layer_sizes) + 6 * d_max * d_max
        return self.BYTES * (within + 5 * self.chunk_tokens * width + scratch)

    def plan(self) -> list[list[Unit]]:
        """Group the units into passes that each fit the memory budget."""
        room = self.memory_budget - self.fixed_bytes()
        units = []
        for row, col in self.pairs():
            width = sum(self.layer_sizes[col])
            block: list[int] = []
            for layer, d in enumerate(self.layer_sizes[row]):
                if block and (sum(self.layer_sizes[row][l] for l in block) + d) * width * self.BYTES > room:
                    units.append(Unit(row, tuple(block), col))
                    block = []
                block.append(layer)
            units.append(Unit(row, tuple(block), col))
        need = max(self.unit_bytes(u) for u in units)
        if need > room:
            raise MemoryBudgetError(f"the correlation engine needs at least {(need + self.fixed_bytes()) / 2**30:.2f} GiB "
                              f"but CORR_MEMORY allows {self.memory_budget / 2**30:.2f} GiB; raise CORR_MEMORY")
        passes, current, used = [], [], 0
        for unit in units:
            size = self.unit_bytes(unit)
            if current and used + size > room:
                passes.append(current)
                current, used = [], 0
            current.append(unit)
            used += size
        passes.append(current)
        return passes

    def unit_bytes(self, unit: Unit) -> int:
        rows = sum(self.layer_sizes[unit.row_model][l] for l in unit.row_layers)
        return self.BYTES * rows * sum(self.layer_sizes[unit.col_model])

    def needed_layers(self, units: list[Unit], first_pass: bool) -> list[set[int]]:
        if first_pass:  # the within-layer co-moments need every layer of every model
            return [set(range(len(sizes))) for sizes in self.layer_sizes]
        needed = [set() for _ in self.layer_sizes]
        for u in units:
            needed[u.row_model].update(u.row_layers)
            needed[u.col_model].update(range(len(self.layer_sizes[u.col_model])))
        return needed

    # ---- streaming ------------------------------------------------------------------
    def run(self, chunks, progress=None) -> dict[int, list[LayerResult]]:
        """All passes; returns {reference model: [LayerResult per layer]}."""
        self.within = [[torch.zeros(d, d, device=self.device) for d in sizes] for sizes in self.layer_sizes]
        self.best: dict = {}
        self._inv_std: dict[int, torch.Tensor] = {}  # filled once the first pass has the variances
        for number, units in enumerate(self.passes):
            start = time.perf_counter()
            cross = self.stream(chunks, units, first_pass=number == 0, progress=progress)
            middle = time.perf_counter()
            self.reduce(units, cross)
            del cross
            self.stream_seconds += middle - start
            self.reduce_seconds += time.perf_counter() - middle
        return self.collect()

    def stream(self, chunks, units: list[Unit], first_pass: bool, progress=None) -> dict[Unit, torch.Tensor]:
        """One pass over the tokens: Chan-merged co-moments of every unit (and, in the
        first pass, every model's within-layer co-moments)."""
        needed = self.needed_layers(units, first_pass)
        cross = {u: torch.zeros(self.unit_bytes(u) // self.BYTES, device=self.device).view(
            sum(self.layer_sizes[u.row_model][l] for l in u.row_layers), -1) for u in units}
        means = [torch.zeros(int(off[-1]), device=self.device) for off in self.offsets]
        n = 0
        for chunk in chunks(needed):
            t = next(a.shape[0] for a, layers in zip(chunk, needed) if layers)
            centred, deltas = [], []
            for m, layers in enumerate(needed):
                if not layers:
                    centred.append(None)
                    deltas.append(None)
                    continue
                mean = chunk[m].mean(0)
                centred.append(chunk[m] - mean)
                deltas.append(mean - means[m])
            weight = n * t / (n + t)
            for u, acc in cross.items():
                rows = self.row_slice(u)
                acc.addmm_(centred[u.row_model][:, rows].T, centred[u.col_model])
                acc.addr_(deltas[u.row_model][rows], deltas[u.col_model], alpha=weight)
                self.flops += 2.0 * t * acc.numel()
            if first_pass:
                for m, sizes in enumerate(self.layer_sizes):
                    for l, d in enumerate(sizes):
                        cols = slice(self.offsets[m][l], self.offsets[m][l + 1])
                        self.within[m][l].addmm_(centred[m][:, cols].T, centred[m][:, cols])
                        self.within[m][l].addr_(deltas[m][cols], deltas[m][cols], alpha=weight)
                        self.flops += 2.0 * t * d * d
            for m, delta in enumerate(deltas):
                if delta is not None:
                    means[m] += delta * (t / (n + t))
            n += t
            self.tokens_streamed += t
            if progress is not None:
                progress(self.tokens_streamed, self)
        return cross

    def row_slice(self, unit: Unit) -> slice:
        off = self.offsets[unit.row_model]
        return slice(int(off[unit.row_layers[0]]), int(off[unit.row_layers[-1] + 1]))

    # ---- results --------------------------------------------------------------------
    def rotation(self, model: int, layer: int, sample: int) -> torch.Tensor:
        """The recorded-seed rotation of `model`'s `layer` for baseline sample `sample`."""
        start = time.perf_counter()
        q = haar_orthogonal(self.layer_sizes[model][layer], [self.rotation_seed, model, layer, sample])
        self.rotation_seconds += time.perf_counter() - start
        return q.to(self.device, torch.float32)

    def inv_std(self, model: int) -> torch.Tensor:
        if model not in self._inv_std:
            self._inv_std[model] = inverse_std(torch.cat([torch.diagonal(s) for s in self.within[model]]))
        return self._inv_std[model]

    def _merge(self, ref: int, other: int, layer_of_ref: int, values, layer_idx, neuron_idx) -> None:
        """Keep the larger max correlation (and where it is) for (ref, layer, other)."""
        key = (ref, layer_of_ref, other)
        values = values.cpu().numpy()
        if key not in self.best:
            d = self.layer_sizes[ref][layer_of_ref]
            self.best[key] = {"max": np.full(d, -np.inf, dtype=np.float32), "layer": np.zeros(d, dtype=np.int64),
                              "neuron": np.zeros(d, dtype=np.int64),
                              "base": np.full((self.n_rotations, d), -np.inf, dtype=np.float32)}
        entry = self.best[key]
        better = values > entry["max"]
        entry["max"][better] = values[better]
        entry["layer"][better] = np.asarray(layer_idx)[better] if np.ndim(layer_idx) else layer_idx
        entry["neuron"][better] = neuron_idx[better]

    def _merge_base(self, ref: int, layer_of_ref: int, other: int, sample: int, values) -> None:
        entry = self.best[(ref, layer_of_ref, other)]
        np.maximum(entry["base"][sample], values.cpu().numpy(), out=entry["base"][sample])

    def reduce(self, units: list[Unit], cross: dict[Unit, torch.Tensor]) -> None:
        """Turn a pass's co-moments into (partial) max and baseline correlations."""
        for u, acc in cross.items():
            row, col = u.row_model, u.col_model
            inv_row, inv_col = self.inv_std(row), self.inv_std(col)
            base = int(self.offsets[row][u.row_layers[0]])
            col_off = self.offsets[col]
            for l in u.row_layers:
                rows = slice(int(self.offsets[row][l]) - base, int(self.offsets[row][l + 1]) - base)
                corr = _corr(acc[rows], inv_row[self.offsets[row][l]:self.offsets[row][l + 1]], inv_col)
                if row in self.references:
                    best, where = corr.max(dim=1)
                    where = where.cpu().numpy()
                    layer_of = np.searchsorted(col_off, where, side="right") - 1
                    self._merge(row, col, l, best, layer_of, where - col_off[layer_of])
                if col in self.references:
                    best, where = corr.max(dim=0)
                    for k in range(len(self.layer_sizes[col])):
                        cols = slice(int(col_off[k]), int(col_off[k + 1]))
                        self._merge(col, row, k, best[cols], l, where[cols].cpu().numpy())
        for r in range(self.n_rotations):
            for m, sizes in enumerate(self.layer_sizes):
                for k in range(len(sizes)):
                    users = [u for u in units if (u.col_model == m and u.row_model in self.references)
                             or (u.row_model == m and k in u.row_layers and u.col_model in self.references)]
                    if not users:
                        continue
                    q = self.rotation(m, k, r)
                    s = self.within[m][k]
                    rotated_inv_std = inverse_std(((s @ q) * q).sum(0))
                    for u in users:
                        self._reduce_rotated(u, cross[u], m, k, r, q, rotated_inv_std)

    def _reduce_rotated(self, u: Unit, acc: torch.Tensor, m: int, k: int, r: int, q: torch.Tensor,
                        rotated_inv_std: torch.Tensor) -> None:
        row, col = u.row_model, u.col_model
        base = int(self.offsets[row][u.row_layers[0]])
        if m == col and row in self.references:  # the row model's neurons against rotated layer k of col
            cols = slice(int(self.offsets[col][k]), int(self.offsets[col][k + 1]))
            rot = _corr(acc[:, cols] @ q, self.inv_std(row)[self.row_slice(u)], rotated_inv_std).max(dim=1).values
            for l in u.row_layers:
                local = slice(int(self.offsets[row][l]) - base, int(self.offsets[row][l + 1]) - base)
                self._merge_base(row, l, col, r, rot[local])
        if m == row and k in u.row_layers and col in self.references:  # col's neurons against rotated row layer k
            rows = slice(int(self.offsets[row][k]), int(self.offsets[row][k + 1]))
            local = slice(rows.start - base, rows.stop - base)
            rot = _corr(acc[local].T @ q, self.inv_std(col), rotated_inv_std).max(dim=1).values
            col_off = self.offsets[col]
            for j in range(len(self.layer_sizes[col])):
                self._merge_base(col, j, row, r, rot[int(col_off[j]):int(col_off[j + 1])])

    def collect(self) -> dict[int, list[LayerResult]]:
        out = {}
        for ref in self.references:
            others = [m for m in range(len(self.layer_sizes)) if m != ref]
            layers = []
            for l in range(len(self.layer_sizes[ref])):
                entries = [self.best[(ref, l, m)] for m in others]
                layers.append(LayerResult(layer=l, others=others,
                                          max_corr=np.stack([e["max"] for e in entries]),
                                          max_layer=np.stack([e["layer"] for e in entries]),
                                          max_neuron=np.stack([e["neuron"] for e in entries]),
                                          baseline_max_corr=np.stack([e["base"] for e in entries])))
            out[ref] = layers
        return out


EXCESS_COLUMNS = ["layer", "neuron", "excess_correlation", "n_models_compared",
                  "max_corr", "mean_corr", "min_corr", "max_baseline", "mean_baseline", "min_baseline"]
PAIRWISE_COLUMNS = ["layer", "neuron", "other_model", "max_corr", "max_layer", "max_neuron", "baseline_max_corr"]


def excess_tables(results: list[LayerResult], model_names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(excess scores, pairwise correlations) for the reference model's neurons.

    excess_correlation = mean over other models of (max corr - max rotated corr, the
    latter averaged over rotation samples)."""
    excess, pairwise = [], []
    for r in sorted(results, key=lambda r: r.layer):
        d = r.max_corr.shape[1]
        baseline = r.baseline_max_corr.mean(axis=1)  # (others, neurons)
        excess.append(pd.DataFrame({
            "layer": r.layer, "neuron": np.arange(d),
            "excess_correlation": (r.max_corr - baseline).mean(axis=0),
            "n_models_compared": len(r.others),
            "max_corr": r.max_corr.max(axis=0), "mean_corr": r.max_corr.mean(axis=0),
            "min_corr": r.max_corr.min(axis=0), "max_baseline": baseline.max(axis=0),
            "mean_baseline": baseline.mean(axis=0), "min_baseline": baseline.min(axis=0)}))
        for k, m in enumerate(r.others):
            pairwise.append(pd.DataFrame({
                "layer": r.layer, "neuron": np.arange(d), "other_model": model_names[m],
                "max_corr": r.max_corr[k], "max_layer": r.max_layer[k], "max_neuron": r.max_neuron[k],
                "baseline_max_corr": baseline[k]}))
    pairwise_df = pd.concat(pairwise, ignore_index=True).sort_values(["layer", "neuron", "other_model"],
                                                                      kind="stable", ignore_index=True)
    return pd.concat(excess, ignore_index=True)[EXCESS_COLUMNS], pairwise_df[PAIRWISE_COLUMNS]


def run_engine(chunks, layer_sizes: list[list[int]], reference: int = 0, n_rotations: int = 5,
               rotation_seed: int = 0, device: str = "cpu", memory_budget: int | None = None,
               progress=None) -> list[LayerResult]:
    """Results of one reference model; `chunks(needed)` yields a fresh stream per pass."""
    engine = ExcessCorrelationEngine(layer_sizes, [reference], n_rotations, rotation_seed, device, memory_budget)
    return engine.run(chunks, progress)[reference]


class MemoryEfficientExcessCorrelationComputer:
    """Excess correlations of a reference model's neurons against loaded models, computed
    without an activation cache: every model runs on the same token batch and the
    activations (rounded to float16, as a cache would store them) feed the engine."""

    def __init__(self, models: list, device: str | torch.device = "cpu", model_names: list[str] | None = None):
        self.models = models
        self.device = device
        self.model_names = model_names or [f"model_{i}" for i in range(len(models))]

    def compute_results(self, dataset, reference: int = 0, n_rotations: int = 5, rotation_seed: int = 0,
                        batch_size: int = 32, keep=None) -> list[LayerResult]:
        from unlib.activations import model_chunks
        from unlib.data import kept_positions

        tokens = np.asarray(dataset.cpu() if isinstance(dataset, torch.Tensor) else dataset)
        keep = kept_positions(tokens, []) if keep is None else np.asarray(keep, dtype=bool)
        sizes = [[m.cfg.d_mlp] * m.cfg.n_layers for m in self.models]
        return run_engine(lambda needed: model_chunks(self.models, tokens, keep, batch_size, self.device), sizes,
                          reference, n_rotations, rotation_seed, self.device)

    def compute_excess_correlations_for_all_neurons(self, dataset, reference: int = 0, n_rotations: int = 5,
                                                    rotation_seed: int = 0, batch_size: int = 32,
                                                    keep=None) -> pd.DataFrame:
        """`dataset`: token ids (n_sequences, ctx_len), BOS in column 0; `keep`: boolean mask
        of the positions analysed (default: all but column 0). Returns the excess-correlation
        table of the reference model."""
        results = self.compute_results(dataset, reference, n_rotations, rotation_seed, batch_size, keep)
        return excess_tables(results, self.model_names)[0]
