"""The correlation engine.

For every neuron of a reference model it finds, in each other model, the best-correlated
neuron (Pearson over the same tokens) and the best correlation after that model's
activations are rotated within each layer by Haar-random orthogonal matrices.

How it stays fast and exact:
- activations arrive in token chunks; each chunk's centred cross-product is one GEMM,
  merged into the running co-moments with Chan's parallel update (no E[xy]-E[x]E[y]);
- rotations are applied after the stream: corr with rotated activations needs only
  C[:, layer] @ Q and the rotated variances diag(Q^T S Q), S being the other model's
  within-layer co-moment, so R rotations cost R small matmuls, not R passes;
- for the split-half error every co-moment (and mean and count) is kept for two halves of
  the rows, even and odd blocks of HALF_BLOCK_ROWS rows (by row index, whatever the feed's
  chunking): each row enters one half only, so the stream does no extra arithmetic, and the
  full-sample co-moment is the exact Chan merge of the halves, formed at reduce time.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from unlib import UserError
from unlib.h5read import H5Reader, read_h5
from unlib.h5write import write_h5

# max_layer and max_neuron of a dead reference neuron (constant over the analysed tokens):
# it has no best match. Its correlations, baselines and excess are 0.
DEAD_MATCH = -1
HALF_BLOCK_ROWS = 2048  # rows per block: even blocks form half A, odd blocks half B
MAX_CHUNK_TOKENS, MIN_CHUNK_TOKENS, CHUNK_BYTES = 4096, 256, 2**30
READ_AHEAD_CHUNKS = 3  # chunks of the feed on the host at once: two queued, one being read
# Haar draws whose Gaussians are drawn ahead on the host, one thread each, while the device
# factors the current one: the host's float64 Gaussian, not the device's QR, is most of a draw
# (0.3 s for 3072 x 3072 on one core of a 2-core CI CPU, about what a whole draw took on an
# H200). A constant, so plans do not depend on the machine.
ROTATION_LOOKAHEAD = 4
HALVES = 2
FULL = HALVES  # index of the full sample next to the halves (0: A, 1: B)


def block_segments(start: int, rows: int, block: int = HALF_BLOCK_ROWS) -> Iterator[tuple[int, int, int]]:
    """(half, lo, hi) for the runs of a chunk's rows [lo, hi) that lie in one block, the
    chunk's first row being row `start` of the stream."""
    lo = 0
    while lo < rows:
        row = start + lo
        hi = min(rows, lo + block - row % block)
        yield (row // block) % HALVES, lo, hi
        lo = hi


def haar_orthogonal(n: int, seed: Iterable[int] | int, device: str | torch.device = "cpu") -> torch.Tensor:
    """A Haar-distributed n x n orthogonal matrix (QR of a Gaussian matrix with the signs
    of R's diagonal moved into Q), float64 on `device`, reproducible from `seed`."""
    return orthogonal_from(gaussian(n, seed), device)


def gaussian(n: int, seed: Iterable[int] | int) -> torch.Tensor:
    """An n x n standard Gaussian float64 matrix drawn on the CPU from `seed`, whatever the
    device, so every device draws the same rotations."""
    state = np.random.SeedSequence(seed).generate_state(2)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(n, n, generator=gen, dtype=torch.float64)


def orthogonal_from(gaussian: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """The Haar rotation of a Gaussian matrix, factored on `device` (on an H200, 60 QRs of
    3072 x 3072 took 34 s on the host's CPU, most of a 43 s correlation)."""
    q, r = torch.linalg.qr(gaussian.to(device))
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
    arrays are indexed [other model, neuron] (baseline: [other model, rotation, neuron]);
    the *_halves arrays hold the same on half A and half B of the rows, [half, ...], NaN
    when the rows do not fill two blocks."""

    layer: int
    others: list[int]
    max_corr: np.ndarray
    max_layer: np.ndarray
    max_neuron: np.ndarray
    baseline_max_corr: np.ndarray
    max_corr_halves: np.ndarray
    baseline_max_corr_halves: np.ndarray

    ARRAYS = ("max_corr", "max_layer", "max_neuron", "baseline_max_corr", "max_corr_halves",
              "baseline_max_corr_halves")

    def save(self, path, attrs: dict) -> None:
        """Write atomically to an HDF5 file, with `attrs` as provenance."""
        write_h5(path, {name: getattr(self, name) for name in self.ARRAYS},
                       {**attrs, "layer": self.layer, "other_index": self.others})

    @staticmethod
    def attributes(path) -> dict:
        """The provenance and timing attributes saved with a result."""
        with H5Reader(path) as reader:
            return reader.attrs

    @classmethod
    def load(cls, path) -> "LayerResult":
        arrays, attrs = read_h5(path)
        return cls(layer=int(attrs["layer"]), others=[int(i) for i in attrs["other_index"]],
                   **{name: arrays[name] for name in cls.ARRAYS})


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


def default_memory_budget(device: str | torch.device, engines: int = 1) -> int:
    """Bytes one engine may use: 80 % of the free memory of the GPU with the least (read with
    nvidia-smi, so that planning creates no CUDA context in a process that forks workers
    afterwards), or on the CPU half the available RAM shared by `engines` running at once."""
    if torch.device(device).type == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout
            return int(0.8 * min(int(mib) for mib in out.split()) * 2**20)
        except (OSError, subprocess.SubprocessError, ValueError):
            raise UserError("cannot read the GPUs' free memory with nvidia-smi: set CORR_MEMORY (e.g. 40G)") from None
    import psutil

    return int(0.5 * psutil.virtual_memory().available) // engines


def chunk_tokens_for(width: int) -> int:
    """Token rows per chunk for `width` neurons a row: MAX_CHUNK_TOKENS, or fewer (a power of
    two, at least MIN_CHUNK_TOKENS) so that a chunk holds at most CHUNK_BYTES. It follows the
    width alone (not the memory budget), so the results do not depend on the budget either;
    five GPT-2-medium seeds (491,520 neurons, 2 MB a row) read 512 rows a chunk."""
    rows = max(1, CHUNK_BYTES // (ExcessCorrelationEngine.BYTES * width))
    return int(min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, 2 ** int(math.log2(rows)))))


class ExcessCorrelationEngine:
    """Max and rotated-baseline correlations of the neurons of each reference model
    against every other model, from activations streamed in token chunks, on all rows
    and on each half of them (even and odd blocks of HALF_BLOCK_ROWS rows).

    Planning: one accumulator (both halves' co-moments) per unordered model pair (split into
    blocks of the row model's layers when the memory budget demands), as many as fit the budget per pass
    over the tokens; `groups(n)` splits the passes further for n tasks. Each pass (`run_pass`)
    takes the statistics of the layers it reads itself, so passes are independent and
    `merge_partials` + `collect` combine them, in plan order, into exactly the one-engine
    result. Feeding: `run(chunks)` calls `chunks(needed)` once per pass; it must
    yield chunk[model] -> (tokens, all of the model's neurons, layer after layer) float32
    tensors on the engine's device, or None for a model with no layer in needed[model];
    the columns of layers not in needed[model] are ignored. The engine never writes to them.
    """

    BYTES = 4  # float32 accumulators

    def __init__(self, layer_sizes: list[list[int]], references: list[int] | int = 0, n_rotations: int = 5,
                 rotation_seed: int = 0, device: str | torch.device = "cpu", memory_budget: int | None = None,
                 chunk_tokens: int | None = None):
        self.layer_sizes = layer_sizes
        self.references = [references] if isinstance(references, int) else sorted(references)
        self.n_rotations = n_rotations
        self.rotation_seed = rotation_seed
        self.device = torch.device(device)
        self.memory_budget = memory_budget or default_memory_budget(self.device)
        self.chunk_tokens = chunk_tokens or chunk_tokens_for(self.width())
        self.offsets = [np.concatenate([[0], np.cumsum(sizes)]).astype(int) for sizes in layer_sizes]
        self.passes = self.plan()
        self.flops = 0.0  # co-moment GEMM work streamed so far
        self.tokens_streamed = 0  # over all passes
        self.half_rows = [0] * HALVES  # rows in each half (the same in every pass)
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

    def width(self, needed: list[set[int]] | None = None) -> int:
        """Neurons in a row of a chunk: every layer of each model with a layer in `needed`
        (default all models), since a chunk holds whole models."""
        needed = needed or self.all_layers()
        return sum(sum(sizes) for sizes, layers in zip(self.layer_sizes, needed) if layers)

    def all_layers(self) -> list[set[int]]:
        """Every layer of every model, as `needed` sets."""
        return [set(range(len(sizes))) for sizes in self.layer_sizes]

    def fixed_bytes(self, needed: list[set[int]] | None = None) -> int:
        """Device memory a pass reading `needed` (default every layer) takes besides its
        accumulators: within-layer co-moments of both halves (only their diagonal for a model
        no baseline rotates); the chunk in use and the centred copy of one block-bounded run
        of it; the result step's scratch (three correlation blocks, both halves' and their
        merge, and a Haar rotation drawn in float64); and on the CPU the feed's host_bytes."""
        needed = needed or self.all_layers()
        within = HALVES * sum(d * d if self.rotated(m) else d
                              for m, layers in enumerate(needed) for d in (self.layer_sizes[m][l] for l in layers))
        width = self.width(needed)
        d_max = max(max(s) for s in self.layer_sizes)
        centred = (min(self.chunk_tokens, HALF_BLOCK_ROWS) + 1) * width
        scratch = 3 * d_max * max(sum(s) for s in self.layer_sizes) + 6 * d_max * d_max
        on_host = self.host_bytes(needed) if self.device.type == "cpu" else 0
        return self.BYTES * (within + self.chunk_tokens * width + centred + scratch) + on_host

    def host_bytes(self, needed: list[set[int]] | None = None) -> int:
        """Host memory besides the device's: the feed's chunks read ahead (READ_AHEAD_CHUNKS)
        and the float64 Gaussians of the Haar draws, the one being factored and those drawn
        ahead (ROTATION_LOOKAHEAD)."""
        rotated = [d for m, sizes in enumerate(self.layer_sizes) if self.rotated(m) for d in sizes]
        return (self.BYTES * READ_AHEAD_CHUNKS * self.chunk_tokens * self.width(needed)
                + 8 * (ROTATION_LOOKAHEAD + 1) * max(rotated, default=0) ** 2)

    def pass_bytes(self, units: list[Unit]) -> int:
        """Memory of one pass over `units` on the engine's device: their accumulators and the
        fixed part."""
        return sum(map(self.unit_bytes, units)) + self.fixed_bytes(self.needed_layers(units))

    def least_memory(self) -> int:
        """The smallest memory budget the work can be planned for: a pass holding one row layer
        of a pair, the largest such."""
        return max(self.pass_bytes([Unit(row, (layer,), col)])
                   for row, col in self.pairs() for layer in range(len(self.layer_sizes[row])))

    def plan(self) -> list[list[Unit]]:
        """Group the work into passes that each fit the memory budget: the row layers of every
        pair, in order, join the current pass while it fits (consecutive row layers of a pair
        forming one unit), so no pass is left part empty where a pair ends."""
        need = self.least_memory()
        if need > self.memory_budget:
            raise MemoryBudgetError(f"the correlation engine needs at least {need / 2**30:.2f} GiB but "
                                    f"CORR_MEMORY allows {self.memory_budget / 2**30:.2f} GiB; raise CORR_MEMORY")
        passes: list[list[Unit]] = []
        current: list[tuple[int, int, int]] = []
        for row, col in self.pairs():
            for layer in range(len(self.layer_sizes[row])):
                if current and self.pass_bytes(self._units(current + [(row, layer, col)])) > self.memory_budget:
                    passes.append(self._units(current))
                    current = []
                current.append((row, layer, col))
        passes.append(self._units(current))
        return passes

    def unit_bytes(self, unit: Unit) -> int:
        """The unit's accumulators: one co-moment block per half."""
        rows = sum(self.layer_sizes[unit.row_model][l] for l in unit.row_layers)
        return HALVES * self.BYTES * rows * sum(self.layer_sizes[unit.col_model])

    def groups(self, parallel: int = 1) -> list[list[Unit]]:
        """The passes, split further until there are `parallel` groups (or the heaviest group
        is one row layer of one pair): each group is one pass over the tokens of its own, so
        separate tasks (workers, GPUs, hosts) can stream them at once, at the cost of one more
        read of the activations per extra group. The heaviest group is halved by work, keeping
        the order of (pair, row layer): the results do not depend on the grouping."""
        groups = [list(p) for p in self.passes]
        while len(groups) < parallel:
            heaviest = max(range(len(groups)), key=lambda i: sum(map(self.unit_bytes, groups[i])))
            rows = [(u.row_model, l, u.col_model) for u in groups[heaviest] for l in u.row_layers]
            if len(rows) < 2:
                break
            work = np.cumsum([self.unit_bytes(Unit(r, (l,), c)) for r, l, c in rows])
            half = work[-1] / 2
            i = int(np.searchsorted(work, half))  # the first i + 1 rows hold half the work or more
            cut = i + 1 if i == 0 or work[i] - half <= half - work[i - 1] else i
            cut = min(max(cut, 1), len(rows) - 1)
            groups[heaviest:heaviest + 1] = [self._units(rows[:cut]), self._units(rows[cut:])]
        return groups

    @staticmethod
    def _units(rows: list[tuple[int, int, int]]) -> list[Unit]:
        """(row model, row layer, col model) triples, in order, as units of consecutive layers."""
        units: list[Unit] = []
        for r, l, c in rows:
            last = units[-1] if units else None
            if last and (last.row_model, last.col_model) == (r, c) and last.row_layers[-1] == l - 1:
                units[-1] = Unit(r, (*last.row_layers, l), c)
            else:
                units.append(Unit(r, (l,), c))
        return units

    def needed_layers(self, units: list[Unit]) -> list[set[int]]:
        """The layers a pass over `units` reads: each unit's row layers and every layer of its
        column model."""
        needed = [set() for _ in self.layer_sizes]
        for u in units:
            needed[u.row_model].update(u.row_layers)
            needed[u.col_model].update(range(len(self.layer_sizes[u.col_model])))
        return needed

    # ---- streaming ------------------------------------------------------------------
    def run(self, chunks, progress=None) -> dict[int, list[LayerResult]]:
        """All passes; returns {reference model: [LayerResult per layer]}."""
        best: dict = {}
        for units in self.passes:
            merge_partials(best, self.run_pass(chunks, units, progress).entries)
        return collect(best, self.layer_sizes, self.references, self.half_rows)

    def run_pass(self, chunks, units: list[Unit], progress=None) -> "PassResult":
        """One pass over the tokens for `units`, with the statistics of every layer it reads
        (within-layer co-moments, means, constant neurons) taken in the same pass: its
        partial best matches, which merge_partials combines with other passes' exactly."""
        needed = self.needed_layers(units)
        # the full co-moment where a baseline rotates the model, else only its diagonal
        self.within = [[torch.zeros(HALVES, *((d, d) if self.rotated(m) else (d,)), device=self.device)
                        if l in needed[m] else None
                        for l, d in enumerate(sizes)] for m, sizes in enumerate(self.layer_sizes)]
        self.best: dict = {}
        self._inv_std: dict[tuple[int, int], torch.Tensor] = {}  # filled once the pass has the variances
        n_models = len(self.layer_sizes)
        # per half and model, each neuron's smallest and largest value: equal = constant
        self.low: list[list[torch.Tensor | None]] = [[None] * n_models for _ in range(HALVES)]
        self.high: list[list[torch.Tensor | None]] = [[None] * n_models for _ in range(HALVES)]
        start = time.perf_counter()
        cross, shift = self.stream(chunks, units, needed, progress=progress)
        self.within_shift = shift
        self._clear_constant(needed)
        middle = time.perf_counter()
        self.reduce(units, cross, shift)
        del cross
        self.stream_seconds += middle - start
        self.reduce_seconds += time.perf_counter() - middle
        for (ref, layer, _), entry in self.best.items():
            entry["dead"] = self.dead(ref, layer)
        return PassResult(self.best, list(self.half_rows))

    def stream(self, chunks, units: list[Unit], needed: list[set[int]],
               progress=None) -> tuple[dict[Unit, torch.Tensor], list[torch.Tensor]]:
        """One pass over the tokens: Chan-merged co-moments of every unit and the
        within-layer co-moments of every `needed` layer, per half. Returns the units'
        ([half, rows, cols] per unit) and per model mean(half B) - mean(half A)."""
        cross = {u: torch.zeros(self.unit_bytes(u) // self.BYTES, device=self.device).view(
            HALVES, sum(self.layer_sizes[u.row_model][l] for l in u.row_layers), -1) for u in units}
        means = [[torch.zeros(int(off[-1]), device=self.device) for off in self.offsets] for _ in range(HALVES)]
        counts = [0] * HALVES
        row = 0
        for chunk in chunks(needed):
            t = next(a.shape[0] for a, layers in zip(chunk, needed) if layers)
            for half, lo, hi in block_segments(row, t):
                self._accumulate([None if a is None else a[lo:hi] for a in chunk], needed, cross, half,
                                 means[half], counts[half])
                counts[half] += hi - lo
            row += t
            self.tokens_streamed += t
            if progress is not None:
                progress(self.tokens_streamed, self)
        self.half_rows = counts
        return cross, [b - a for a, b in zip(*means)]

    def _accumulate(self, part: list, needed: list[set[int]], cross: dict[Unit, torch.Tensor], half: int,
                    means: list[torch.Tensor], n: int) -> None:
        """Merge rows of one block into half `half`'s co-moments and means (n rows so far)."""
        t = next(a.shape[0] for a, layers in zip(part, needed) if layers)
        scale = math.sqrt(n * t / (n + t))
        centred = []
        for m, layers in enumerate(needed):
            if not layers:
                centred.append(None)
                continue
            # two reads, yet 5x faster than torch.aminmax along dim 0 on the CPU (torch 2.13)
            low, high = part[m].amin(0), part[m].amax(0)
            if self.low[half][m] is not None:
                low, high = torch.minimum(self.low[half][m], low), torch.maximum(self.high[half][m], high)
            self.low[half][m], self.high[half][m] = low, high
            mean = part[m].mean(0)
            delta = mean - means[m]
            # The centred rows plus one row sqrt(n t / (n + t)) * delta: one GEMM then also adds
            # Chan's correction n t / (n + t) * outer(delta), sparing a rank-1 sweep of the
            # accumulator per block-bounded run.
            x = torch.empty(t + 1, part[m].shape[1], device=self.device)
            torch.sub(part[m], mean, out=x[:t])
            torch.mul(delta, scale, out=x[t])
            centred.append(x)
            means[m] += delta * (t / (n + t))
        # One GEMM per row layer, whatever the unit's block of layers: every product then has
        # the same shape however the work is split into units, passes and tasks, so the
        # results are bitwise the same.
        for u, acc in cross.items():
            base = int(self.offsets[u.row_model][u.row_layers[0]])
            for l in u.row_layers:
                rows = self.layer_slice(u.row_model, l)
                acc[half][rows.start - base:rows.stop - base].addmm_(centred[u.row_model][:, rows].T,
                                                                     centred[u.col_model])
            self.flops += 2.0 * t * acc[half].numel()
        for m, layers in enumerate(needed):
            rotated = self.rotated(m)
            for l in sorted(layers):
                cols = self.layer_slice(m, l)
                x = centred[m][:, cols]
                if rotated:
                    self.within[m][l][half].addmm_(x.T, x)
                    self.flops += 2.0 * t * self.layer_sizes[m][l] ** 2
                else:  # only the variances are used: the diagonal
                    self.within[m][l][half].add_((x * x).sum(0))

    def rotated(self, model: int) -> bool:
        """Whether some rotated baseline rotates `model`'s layers (another model is a
        reference), so that its full within-layer co-moments are needed, not only their
        diagonal (the variances)."""
        return any(ref != model for ref in self.references)

    def layer_slice(self, model: int, layer: int) -> slice:
        """The columns of `model`'s `layer` among all of the model's neurons."""
        return slice(int(self.offsets[model][layer]), int(self.offsets[model][layer + 1]))

    # ---- results --------------------------------------------------------------------
    def rotation(self, model: int, layer: int, sample: int) -> torch.Tensor:
        """The recorded-seed rotation of `model`'s `layer` for baseline sample `sample`."""
        return next(self.rotations([(model, layer, sample)]))

    def rotations(self, draws: list[tuple[int, int, int]]) -> Iterator[torch.Tensor]:
        """The recorded-seed rotation of each (model, layer, sample) in `draws`, float32 on
        the device, in order: the Gaussians are drawn on the host ROTATION_LOOKAHEAD ahead, in
        as many threads, while the device factors the current one (the same numbers)."""
        todo = iter(draws)
        pool = ThreadPoolExecutor(ROTATION_LOOKAHEAD)
        ahead: collections.deque = collections.deque()

        def draw_next() -> None:
            for model, layer, sample in itertools.islice(todo, 1):
                ahead.append(pool.submit(gaussian, self.layer_sizes[model][layer],
                                         [self.rotation_seed, model, layer, sample]))
        try:
            for _ in range(ROTATION_LOOKAHEAD):
                draw_next()
            while ahead:
                start = time.perf_counter()
                drawn = ahead.popleft().result()
                draw_next()
                q = orthogonal_from(drawn, self.device).to(torch.float32)
                del drawn
                self.rotation_seconds += time.perf_counter() - start
                yield q
        finally:  # also when the caller stops early or fails: no draw left running
            pool.shutdown(wait=True, cancel_futures=True)

    @property
    def merge_weight(self) -> float:
        """n_A n_B / n: the weight of the outer product of the halves' mean difference in
        the Chan merge C = C_A + C_B + n_A n_B / n * outer(mean_B - mean_A)."""
        n_a, n_b = self.half_rows
        return n_a * n_b / max(n_a + n_b, 1)

    def constant(self, model: int, variant: int) -> torch.Tensor:
        """Which neurons of `model` are constant (every value equal) on half A (0), half B (1)
        or all rows (FULL): compared exactly, so the rounding of float32 means cannot give
        them a tiny variance and noise correlations. A half without rows: all constant."""
        halves = [h for h in range(HALVES) if self.low[h][model] is not None and (variant == FULL or h == variant)]
        if not halves:
            return torch.ones(int(self.offsets[model][-1]), dtype=torch.bool, device=self.device)
        low = torch.stack([self.low[h][model] for h in halves]).amin(0)
        high = torch.stack([self.high[h][model] for h in halves]).amax(0)
        return low == high

    def _clear_constant(self, needed: list[set[int]]) -> None:
        """Zero the within-layer co-moments and mean shifts of constant neurons (rounding
        noise), so that the rotated baselines' variances hold none of it either."""
        for m, layers in enumerate(needed):
            if not layers:
                continue
            flat = [self.constant(m, h) for h in range(HALVES)]
            self.within_shift[m][self.constant(m, FULL)] = 0
            for l in layers:
                cols = self.layer_slice(m, l)
                for h in range(HALVES):
                    dead = flat[h][cols]
                    self.within[m][l][h][dead] = 0
                    if self.rotated(m):
                        self.within[m][l][h][:, dead] = 0

    def inv_std(self, model: int, variant: int) -> torch.Tensor:
        """1/std of every neuron of `model` on half A (0), half B (1) or all rows (FULL); 0
        for a constant neuron."""
        key = (model, variant)
        if key not in self._inv_std:
            # layers this pass does not read have no co-moments: variance 0 (never used)
            halves = torch.cat([torch.zeros(HALVES, d, device=self.device) if s is None else
                                torch.diagonal(s, dim1=-2, dim2=-1) if self.rotated(model) else s
                                for s, d in zip(self.within[model], self.layer_sizes[model])], dim=1)
            var = halves[variant] if variant < HALVES else \
                halves.sum(0) + self.merge_weight * self.within_shift[model] ** 2
            self._inv_std[key] = inverse_std(torch.where(self.constant(model, variant), 0.0, var))
        return self._inv_std[key]

    def _merge(self, ref: int, other: int, layer_of_ref: int, variant: int, values, layer_idx, neuron_idx) -> None:
        """Keep the larger max correlation for (ref, layer, other) on `variant`, and on the
        full sample where it is."""
        key = (ref, layer_of_ref, other)
        values = values.cpu().numpy()
        if key not in self.best:
            d = self.layer_sizes[ref][layer_of_ref]
            self.best[key] = {"max": np.full((HALVES + 1, d), -np.inf, dtype=np.float32),
                              "layer": np.zeros(d, dtype=np.int64), "neuron": np.zeros(d, dtype=np.int64),
                              "base": np.full((HALVES + 1, self.n_rotations, d), -np.inf, dtype=np.float32)}
        entry = self.best[key]
        if variant < HALVES:
            np.maximum(entry["max"][variant], values, out=entry["max"][variant])
            return
        better = values > entry["max"][FULL]
        entry["max"][FULL][better] = values[better]
        entry["layer"][better] = np.asarray(layer_idx)[better] if np.ndim(layer_idx) else layer_idx
        entry["neuron"][better] = neuron_idx[better]

    def _merge_base(self, ref: int, layer_of_ref: int, other: int, variant: int, sample: int, values) -> None:
        entry = self.best[(ref, layer_of_ref, other)]
        np.maximum(entry["base"][variant, sample], values.cpu().numpy(), out=entry["base"][variant, sample])

    def reduce(self, units: list[Unit], cross: dict[Unit, torch.Tensor], shift: list[torch.Tensor]) -> None:
        """Turn a pass's co-moments into (partial) max and baseline correlations, on each
        half and on all rows (the halves' Chan merge, one block at a time)."""
        weight = self.merge_weight
        for u, acc in cross.items():
            row, col = u.row_model, u.col_model
            base = int(self.offsets[row][u.row_layers[0]])
            col_off = self.offsets[col]
            for l in u.row_layers:
                rows = slice(int(self.offsets[row][l]), int(self.offsets[row][l + 1]))
                local = slice(rows.start - base, rows.stop - base)
                full = acc[0, local] + acc[1, local]
                full.addr_(shift[row][rows], shift[col], alpha=weight)
                for variant, block in enumerate([acc[0, local], acc[1, local], full]):
                    corr = _corr(block, self.inv_std(row, variant)[rows], self.inv_std(col, variant))
                    if row in self.references:
                        best, where = corr.max(dim=1)
                        where = where.cpu().numpy()
                        layer_of = np.searchsorted(col_off, where, side="right") - 1
                        self._merge(row, col, l, variant, best, layer_of, where - col_off[layer_of])
                    if col in self.references:
                        best, where = corr.max(dim=0)
                        for k in range(len(self.layer_sizes[col])):
                            cols = slice(int(col_off[k]), int(col_off[k + 1]))
                            self._merge(col, row, k, variant, best[cols], l, where[cols].cpu().numpy())
                    del corr
        draws = [(m, k, r) for r in range(self.n_rotations) for m, k in self.rotated_layers(units)]
        for (m, k, r), q in zip(draws, self.rotations(draws)):
            users = self.rotation_users(units, m, k)
            s = self.within[m][k]
            # diag(Q^T S Q) per half; the full sample's follows from the Chan merge
            var = [((s[h] @ q) * q).sum(0) for h in range(HALVES)]
            cols = slice(int(self.offsets[m][k]), int(self.offsets[m][k + 1]))
            var.append(var[0] + var[1] + weight * (self.within_shift[m][cols] @ q) ** 2)
            rotated_inv_std = [inverse_std(v) for v in var]
            for u in users:
                self._reduce_rotated(u, cross[u], shift, m, k, r, q, rotated_inv_std)

    def rotation_users(self, units: list[Unit], model: int, layer: int) -> list[Unit]:
        """The units whose baselines rotate `model`'s `layer`: a reference's rows against it
        (it is in the column model), or a reference column model against it (a row layer)."""
        return [u for u in units if (u.col_model == model and u.row_model in self.references)
                or (u.row_model == model and layer in u.row_layers and u.col_model in self.references)]

    def rotated_layers(self, units: list[Unit]) -> list[tuple[int, int]]:
        """(model, layer) of every layer a pass over `units` rotates, once per baseline sample."""
        return [(m, k) for m, sizes in enumerate(self.layer_sizes) for k in range(len(sizes))
                if self.rotation_users(units, m, k)]

    def stream_flops(self, units: list[Unit], n_tokens: int) -> float:
        """GEMM work of streaming `n_tokens` rows for `units`: their co-moments, and the full
        within-layer co-moments of the rotated models' layers they read (as the stream counts it)."""
        cross = sum(self.unit_bytes(u) // (HALVES * self.BYTES) for u in units)  # rows x cols
        within = sum(self.layer_sizes[m][l] ** 2 for m, layers in enumerate(self.needed_layers(units))
                     if self.rotated(m) for l in layers)
        return 2.0 * n_tokens * (cross + within)

    def reduce_flops(self, units: list[Unit]) -> float:
        """GEMM work of the result step for `units`: per baseline sample and rotated layer,
        the rotated variances diag(Q^T S Q) of both halves and the co-moment blocks times Q.
        The Haar draws themselves (QR factorisations) are counted by rotated_layers."""
        total = 0.0
        for m, k in self.rotated_layers(units):
            d = self.layer_sizes[m][k]
            total += HALVES * 2.0 * d ** 3
            for u in self.rotation_users(units, m, k):
                if u.col_model == m and u.row_model in self.references:
                    rows = sum(self.layer_sizes[u.row_model][l] for l in u.row_layers)
                    total += HALVES * 2.0 * rows * d * d
                if u.row_model == m and k in u.row_layers and u.col_model in self.references:
                    total += HALVES * 2.0 * sum(self.layer_sizes[u.col_model]) * d * d
        return self.n_rotations * total

    def _reduce_rotated(self, u: Unit, acc: torch.Tensor, shift: list[torch.Tensor], m: int, k: int, r: int,
                        q: torch.Tensor, rotated_inv_std: list[torch.Tensor]) -> None:
        """Baselines against rotated layer k of model m, on each half and on all rows: the
        merge commutes with the rotation, (C_A + C_B + w outer(a, b)) Q = C_A Q + C_B Q
        + w outer(a, Q^T b), so the full sample costs no matmul of its own."""
        row, col = u.row_model, u.col_model
        base = int(self.offsets[row][u.row_layers[0]])
        weight = self.merge_weight
        if m == col and row in self.references:  # the row model's neurons against rotated layer k of col
            cols = self.layer_slice(col, k)
            rotated_shift = shift[col][cols] @ q
            for l in u.row_layers:  # one row layer at a time, as in the stream (bitwise the same in any split)
                rows = self.layer_slice(row, l)
                local = slice(rows.start - base, rows.stop - base)
                blocks = [acc[h][local, cols] @ q for h in range(HALVES)]
                blocks.append(blocks[0] + blocks[1])
                blocks[FULL].addr_(shift[row][rows], rotated_shift, alpha=weight)
                for variant, block in enumerate(blocks):
                    rot = block.mul_(self.inv_std(row, variant)[rows, None]).mul_(rotated_inv_std[variant])
                    self._merge_base(row, l, col, variant, r, rot.amax(dim=1))
        if m == row and k in u.row_layers and col in self.references:  # col's neurons against rotated row layer k
            rows = slice(int(self.offsets[row][k]), int(self.offsets[row][k + 1]))
            local = slice(rows.start - base, rows.stop - base)
            blocks = [acc[h][local].T @ q for h in range(HALVES)]
            blocks.append(blocks[0] + blocks[1])
            blocks[FULL].addr_(shift[col], shift[row][rows] @ q, alpha=weight)
            col_off = self.offsets[col]
            for variant, block in enumerate(blocks):
                rot = block.mul_(self.inv_std(col, variant)[:, None]).mul_(rotated_inv_std[variant]).amax(dim=1)
                for j in range(len(self.layer_sizes[col])):
                    self._merge_base(col, j, row, variant, r, rot[int(col_off[j]):int(col_off[j + 1])])

    def dead(self, model: int, layer: int) -> np.ndarray:
        """Which neurons of `model`'s `layer` are constant over all the rows (dead)."""
        cols = slice(int(self.offsets[model][layer]), int(self.offsets[model][layer + 1]))
        return self.constant(model, FULL)[cols].cpu().numpy()



@dataclasses.dataclass
class PassResult:
    """One pass's partial best matches, {(reference, reference layer, other model): entry},
    each entry holding per variant (half A, half B, all rows) the max correlation ("max"),
    the max against each rotation ("base"), where the all-rows max is ("layer", "neuron"),
    and which reference neurons are constant ("dead"); and the rows in each half."""

    entries: dict[tuple[int, int, int], dict[str, np.ndarray]]
    half_rows: list[int]
    attrs: dict = dataclasses.field(default_factory=dict)  # what load() found saved with it

    FIELDS = ("max", "layer", "neuron", "base", "dead")

    def save(self, path, attrs: dict) -> None:
        """Write atomically to an HDF5 file, one group per entry, with `attrs` (and half_rows)."""
        write_h5(path, {f"{ref}/{layer}/{other}/{name}": entry[name]
                              for (ref, layer, other), entry in self.entries.items() for name in self.FIELDS},
                       {**attrs, "half_rows": self.half_rows})

    @classmethod
    def load(cls, path) -> "PassResult":
        arrays, attrs = read_h5(path)
        entries: dict = {}
        for name, values in arrays.items():
            ref, layer, other, field = name.split("/")
            entries.setdefault((int(ref), int(layer), int(other)), {})[field] = values
        return cls(entries, [int(n) for n in attrs["half_rows"]], attrs)


def merge_partials(best: dict, entries: dict) -> None:
    """Merge a pass's entries into `best` in place, exactly as if its units had come after
    those already merged: maxima are kept, and where the all-rows max ties, the earlier
    match. Merging the passes (or groups) in plan order therefore gives the one-engine result."""
    for key, entry in entries.items():
        if key not in best:
            best[key] = {name: value.copy() for name, value in entry.items()}
            continue
        into = best[key]
        np.maximum(into["max"][:HALVES], entry["max"][:HALVES], out=into["max"][:HALVES])
        np.maximum(into["base"], entry["base"], out=into["base"])
        better = entry["max"][FULL] > into["max"][FULL]
        into["max"][FULL][better] = entry["max"][FULL][better]
        into["layer"][better] = entry["layer"][better]
        into["neuron"][better] = entry["neuron"][better]


def collect(best: dict, layer_sizes: list[list[int]], references: list[int],
            half_rows: list[int]) -> dict[int, list[LayerResult]]:
    """{reference: [LayerResult per layer]} from the merged entries of every pass; the
    halves' arrays are NaN unless the rows fill two blocks (both halves hold one at least)."""
    out = {}
    for ref in references:
        others = [m for m in range(len(layer_sizes)) if m != ref]
        layers = []
        for l in range(len(layer_sizes[ref])):
            entries = [best[(ref, l, m)] for m in others]
            halves = np.stack([e["max"][:HALVES] for e in entries], axis=1)
            base_halves = np.stack([e["base"][:HALVES] for e in entries], axis=1)
            if min(half_rows) < HALF_BLOCK_ROWS:
                halves[:], base_halves[:] = np.nan, np.nan
            # A dead (constant) reference neuron correlates 0 with everything: no best match
            # is claimed for it (DEAD_MATCH), rather than the first neuron the argmax meets.
            dead = entries[0]["dead"]
            max_layer = np.stack([np.where(dead, DEAD_MATCH, e["layer"]) for e in entries])
            max_neuron = np.stack([np.where(dead, DEAD_MATCH, e["neuron"]) for e in entries])
            layers.append(LayerResult(layer=l, others=others,
                                      max_corr=np.stack([e["max"][FULL] for e in entries]),
                                      max_layer=max_layer, max_neuron=max_neuron,
                                      baseline_max_corr=np.stack([e["base"][FULL] for e in entries]),
                                      max_corr_halves=halves, baseline_max_corr_halves=base_halves))
        out[ref] = layers
    return out


EXCESS_COLUMNS = ["layer", "neuron", "excess_correlation", "n_models_compared",
                  "max_corr", "mean_corr", "min_corr", "max_baseline", "mean_baseline", "min_baseline"]
# After the split-half columns (the columns before keep their places): the neuron is constant
# over the analysed tokens, so it has no best match (max_layer/max_neuron DEAD_MATCH).
DEAD_COLUMN = "dead"
SPLIT_HALF_COLUMNS = ["excess_half_a", "excess_half_b", "excess_se", "excess_ci_low", "excess_ci_high"]
PAIRWISE_COLUMNS = ["layer", "neuron", "other_model", "max_corr", "max_layer", "max_neuron", "baseline_max_corr"]
Z_95 = 1.96  # two-sided 95 % normal quantile


def split_half_error(half_a: np.ndarray, half_b: np.ndarray) -> np.ndarray:
    """Standard error of a layer's full-sample excess correlations from its two halves'.

    Per neuron se_i = |a_i - b_i| / 2 (the variance of the full-sample mean of two
    independent halves); with one degree of freedom it is often far too small, so it is
    floored by the layer's pooled se_L = sqrt(mean_i se_i^2): se = max(se_i, se_L)."""
    per_neuron = np.abs(half_a - half_b) / 2
    pooled = np.sqrt(np.mean(per_neuron ** 2))
    return np.maximum(per_neuron, pooled)


def excess_tables(results: list[LayerResult], model_names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(excess scores, pairwise correlations) for the reference model's neurons.

    excess_correlation = mean over other models of (max corr - max rotated corr, the
    latter averaged over rotation samples); excess_half_a/b the same on each half of the
    rows; excess_se (split_half_error) and the 95 % interval excess +- 1.96 excess_se."""
    excess, pairwise = [], []
    for r in sorted(results, key=lambda r: r.layer):
        d = r.max_corr.shape[1]
        baseline = r.baseline_max_corr.mean(axis=1)  # (others, neurons)
        score = (r.max_corr - baseline).mean(axis=0)
        half_a, half_b = (r.max_corr_halves - r.baseline_max_corr_halves.mean(axis=2)).mean(axis=1)
        se = split_half_error(half_a, half_b)
        excess.append(pd.DataFrame({
            "layer": r.layer, "neuron": np.arange(d),
            "excess_correlation": score,
            "n_models_compared": len(r.others),
            "max_corr": r.max_corr.max(axis=0), "mean_corr": r.max_corr.mean(axis=0),
            "min_corr": r.max_corr.min(axis=0), "max_baseline": baseline.max(axis=0),
            "mean_baseline": baseline.mean(axis=0), "min_baseline": baseline.min(axis=0),
            "excess_half_a": half_a, "excess_half_b": half_b, "excess_se": se,
            "excess_ci_low": score - Z_95 * se, "excess_ci_high": score + Z_95 * se,
            DEAD_COLUMN: (r.max_layer == DEAD_MATCH).all(axis=0)}))
        for k, m in enumerate(r.others):
            pairwise.append(pd.DataFrame({
                "layer": r.layer, "neuron": np.arange(d), "other_model": model_names[m],
                "max_corr": r.max_corr[k], "max_layer": r.max_layer[k], "max_neuron": r.max_neuron[k],
                "baseline_max_corr": baseline[k]}))
    pairwise_df = pd.concat(pairwise, ignore_index=True).sort_values(["layer", "neuron", "other_model"],
                                                                      kind="stable", ignore_index=True)
    return (pd.concat(excess, ignore_index=True)[EXCESS_COLUMNS + SPLIT_HALF_COLUMNS + [DEAD_COLUMN]],
            pairwise_df[PAIRWISE_COLUMNS])


def run_engine(chunks, layer_sizes: list[list[int]], reference: int = 0, n_rotations: int = 5,
               rotation_seed: int = 0, device: str = "cpu", memory_budget: int | None = None,
               progress=None) -> list[LayerResult]:
    """Results of one reference model; `chunks(needed)` yields a fresh stream per pass."""
    engine = ExcessCorrelationEngine(layer_sizes, [reference], n_rotations, rotation_seed, device, memory_budget)
    return engine.run(chunks, progress)[reference]


class MemoryEfficientExcessCorrelationComputer:
    """Excess correlations of a reference model's neurons against the other models, computed
    without an activation cache: every model runs on the same token batch and the
    activations (float32, as a cache holds them) feed the engine.

    model_names: a model set name (`toy-zoo-mini`, `stanford-gpt2-small`; a toy zoo must be
    trained in the store already), a list of Hugging Face names and local model folders (or
    one comma-separated string), loaded at `checkpoint` (None: final weights) onto `device`
    ("auto": cuda when available); or models already loaded as TransformerBridges, named by
    `labels` (default model_0, model_1, ...) and left on their own device under "auto"."""

    def __init__(self, model_names, device: str | torch.device = "auto", checkpoint: int | None = None,
                 labels: list[str] | None = None, store_dir: str | None = None):
        from unlib.checkpoints import check_checkpoint, model_location
        from unlib.model_loading import check_same_tokenizer, load_model, resolve_device
        from unlib.model_sets import ModelError, resolve_model_set

        self.store_dir = store_dir
        self.model_set = None
        if isinstance(model_names, (str, os.PathLike)) or all(isinstance(m, (str, os.PathLike)) for m in model_names):
            models = os.fspath(model_names) if isinstance(model_names, (str, os.PathLike)) \
                else ",".join(map(os.fspath, model_names))
            self.model_set = resolve_model_set(models, store_dir)
            self.device = resolve_device(str(device))
            for spec in self.model_set.models:
                check_checkpoint(spec, checkpoint)
                if spec.zoo and not os.path.isdir(model_location(spec, checkpoint)[0]):
                    raise ModelError(f"model {spec.name} is not trained in the store ({spec.source}): run the "
                                     f"analysis of {spec.zoo} once (make analyze MODELS={spec.zoo}, or "
                                     f"run_universal_neurons_analysis) to train it")
            if self.model_set.zoo is None:
                check_same_tokenizer(self.model_set.models)
            self.models = [load_model(spec, checkpoint, self.device) for spec in self.model_set.models]
            self.model_names = labels or [spec.name for spec in self.model_set.models]
        else:
            self.models = list(model_names)
            if any(isinstance(m, (str, os.PathLike)) for m in self.models):
                raise ModelError("give model names and folders, or loaded models, not both")
            self.device = next(self.models[0].parameters()).device if str(device) == "auto" else device
            self.model_names = labels or [f"model_{i}" for i in range(len(self.models))]

    def tokenizer(self):
        """The models' tokenizer: the set's (a toy zoo's own, else the first model's), or
        the first loaded model's."""
        from unlib.model_loading import load_tokenizer

        if self.model_set is not None:
            return load_tokenizer(self.model_set, self.store_dir)
        tokenizer = getattr(self.models[0], "tokenizer", None)
        if tokenizer is None:
            raise UserError("the first model has no tokenizer to read a dataset with: give token ids instead")
        return tokenizer

    def tokens(self, dataset_path, keep=None, n_tokens: int | None = None, ctx_len: int | None = None,
               exclude_tokens: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids (sequences, ctx_len), boolean mask of the analysed positions).

        dataset_path: a DATASET value (local .txt/.jsonl/.json/.parquet/.npy files, a Hugging
        Face dataset `name[:config][@split]`, python-stdlib), tokenized exactly as the
        pipeline does: n_tokens analysed positions (default 100000) in BOS-led sequences of
        ctx_len tokens, the positions of exclude_tokens dropped (EXCLUDE_TOKENS syntax);
        ctx_len and exclude_tokens default to the model set's (for loaded models or a list
        of models: 512 capped at the models' context, and bos,eos,pad,newline).
        Or token ids (n_sequences, ctx_len), BOS in column 0, with `keep` (default: every
        position but column 0)."""
        from unlib.dataset import check_dataset, load_texts
        from unlib.exclusion import exclusion_ids, kept_positions
        from unlib.tokens import DEFAULT_N_TOKENS, token_sequences
        from unlib.model_sets import PAPER_DEFAULTS

        if not isinstance(dataset_path, (str, os.PathLike)):
            tokens = np.asarray(dataset_path.cpu() if isinstance(dataset_path, torch.Tensor) else dataset_path)
            return tokens, kept_positions(tokens, []) if keep is None else np.asarray(keep, dtype=bool)
        if keep is not None:
            raise UserError("keep applies to token ids; for a dataset, choose the positions with exclude_tokens")
        dataset = os.fspath(dataset_path)
        check_dataset(dataset)
        defaults = PAPER_DEFAULTS if self.model_set is None else self.model_set.defaults
        if ctx_len is None:
            ctx_len = min([defaults.ctx_len] + [m.cfg.n_ctx for m in self.models if getattr(m.cfg, "n_ctx", None)])
        tokenizer = self.tokenizer()
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        exclude = exclusion_ids(defaults.exclude_tokens if exclude_tokens is None else exclude_tokens, tokenizer)
        tokens, keep, _ = token_sequences(load_texts(dataset), tokenizer, bos, n_tokens or DEFAULT_N_TOKENS, ctx_len,
                                          exclude)
        return tokens, keep

    def compute_results(self, dataset_path, reference: int = 0, n_rotations: int = 5, rotation_seed: int = 0,
                        batch_size: int = 32, keep=None, n_tokens: int | None = None, ctx_len: int | None = None,
                        exclude_tokens: str | None = None) -> list[LayerResult]:
        """The engine's per-layer results for the reference model (see tokens())."""
        from unlib.activations import model_chunks

        tokens, keep = self.tokens(dataset_path, keep, n_tokens, ctx_len, exclude_tokens)
        sizes = [[m.cfg.d_mlp] * m.cfg.n_layers for m in self.models]
        return run_engine(lambda needed: model_chunks(self.models, tokens, keep, batch_size, self.device), sizes,
                          reference, n_rotations, rotation_seed, self.device)

    def compute_excess_correlations_for_all_neurons(self, dataset_path, reference: int = 0, n_rotations: int = 5,
                                                    rotation_seed: int = 0, batch_size: int = 32, keep=None,
                                                    n_tokens: int | None = None, ctx_len: int | None = None,
                                                    exclude_tokens: str | None = None) -> pd.DataFrame:
        """The excess-correlation table of the reference model (the columns of
        excess_correlation_scores.csv) over `dataset_path`: a dataset path or name, or token
        ids (see tokens())."""
        results = self.compute_results(dataset_path, reference, n_rotations, rotation_seed, batch_size, keep,
                                       n_tokens, ctx_len, exclude_tokens)
        return excess_tables(results, self.model_names)[0]
