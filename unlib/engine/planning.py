"""The plan of a correlation: its work split into passes over the tokens that each fit the
memory budget, passes split further into groups for parallel tasks, and what each costs in
memory, bytes read and FLOPs. Planning touches no device."""
from __future__ import annotations

import numpy as np
import torch

from unlib.engine.halves import HALF_BLOCK_ROWS
from unlib.engine.layout import BYTES, HALVES, Layout, Unit, units_of
from unlib.engine.memory import (HOST_CHUNKS, MemoryBudgetError, ModelFeed, chunk_tokens_for,
                                 default_memory_budget)
from unlib.engine.precision import Products
from unlib.engine.rotations import draw_bytes


class WorkPlan:
    """One accumulator (both halves' co-moments) per unordered model pair involving a
    reference (split into blocks of the row model's layers when the memory budget demands),
    as many as fit the budget per pass over the tokens (`passes`); `groups(n)` splits the
    passes further for n tasks. `feed`: how the activations arrive, from caches (None) or
    from the models run on the device (a ModelFeed), which the memory of a pass counts.
    `precision`: the stream's products (unlib.engine.precision), whose operands the memory of
    a pass counts too."""

    def __init__(self, layer_sizes: list[list[int]], references: list[int] | int = 0, n_rotations: int = 5,
                 device: str | torch.device = "cpu", memory_budget: int | None = None,
                 chunk_tokens: int | None = None, feed: ModelFeed | None = None, n_tokens: int | None = None,
                 precision: str = "fp32"):
        self.layout = Layout(layer_sizes, references)
        self.precision = precision
        self.n_rotations = n_rotations
        self.device = torch.device(device)
        self.products = Products(precision, self.device)  # refuses a mode the device cannot run
        self.memory_budget = memory_budget or default_memory_budget(self.device)
        self.chunk_tokens = chunk_tokens or chunk_tokens_for(self.layout.width())
        self.feed = feed
        self.n_tokens = n_tokens  # the tokens streamed, where known: fewer than the chunks read ahead hold
        self.passes = self._plan()

    @property
    def layer_sizes(self) -> list[list[int]]:
        return self.layout.layer_sizes

    @property
    def references(self) -> list[int]:
        return self.layout.references

    # ---- memory ---------------------------------------------------------------------
    def chunk_rows(self) -> int:
        """Token rows of a chunk as the feed hands it over: chunk_tokens from the caches; from
        the models, the positions of the whole sequences a chunk holds."""
        if self.feed is None:
            return self.chunk_tokens
        return self.feed.sequences(self.chunk_tokens) * self.feed.ctx_len

    def unit_bytes(self, unit: Unit) -> int:
        """The unit's accumulators: one co-moment block per half."""
        return HALVES * BYTES * self.layout.unit_rows(unit) * sum(self.layer_sizes[unit.col_model])

    def accumulator_bytes(self, units: list[Unit]) -> int:
        """The accumulators of a pass over `units`."""
        return sum(map(self.unit_bytes, units))

    def statistics_bytes(self, units: list[Unit]) -> int:
        """The per-layer statistics a pass keeps besides its accumulators: within-layer
        co-moments of both halves of the layers it reads (only their diagonal for a model no
        baseline rotates), and both halves' means, minima and maxima of every neuron."""
        layout = self.layout
        within = sum(d * d if layout.rotated(m) else d
                     for m, layers in enumerate(layout.needed_layers(units)) for d in (self.layer_sizes[m][l] for l in layers))
        return HALVES * BYTES * (within + 3 * layout.width())

    def phases(self, units: list[Unit]) -> list[tuple[int, int]]:
        """(device, host) working memory of each phase of a pass over `units` besides its
        accumulators and statistics: the stream, then the result step's correlations, its
        rotated baselines and its QR factorisations."""
        return [self.stream_bytes(units), *self.reduce_bytes(units)]

    def stream_bytes(self, units: list[Unit]) -> tuple[int, int]:
        """(device, host) working memory of the stream. Caches: the chunks on the host
        (HOST_CHUNKS, or as many as n_tokens fill), and on a GPU the chunk in use. Models: their weights, the chunk they
        fill and the largest forward pass's working memory, all on the device. Both: the
        centred copy of one block-bounded run of the chunk and the square of one layer's run
        (the variances of a model no baseline rotates), and the operands' extra copies of it
        (bf16x3's two parts, bf16's copy on a GPU)."""
        needed = self.layout.needed_layers(units)
        width, rows = self.layout.width(needed), self.chunk_rows()
        chunks = HOST_CHUNKS
        if self.n_tokens:
            rows = min(rows, self.n_tokens)
            chunks = min(HOST_CHUNKS, -(-self.n_tokens // rows))
        chunk = BYTES * rows * width
        run = min(rows, HALF_BLOCK_ROWS) + 1
        extra = self.products.extra_copies()
        centred = BYTES * run * (int((1 + extra) * width) + max(max(s) for s in self.layer_sizes))
        on_gpu = self.device.type != "cpu"
        if self.feed is None:
            return centred + (chunk if on_gpu else 0), chunks * chunk
        models = [f for f, layers in zip(self.feed.models, needed) if layers]
        forward = max(f.forward_bytes(self.feed.sequences(self.chunk_tokens), self.feed.ctx_len) for f in models)
        weights = sum(f.weight_bytes for f in models)
        if on_gpu:  # a model loads on the host, then moves to the GPU
            return weights + chunk + max(forward, centred), max(f.weight_bytes for f in models)
        # on the CPU the weights stay in the file's mapped pages and, from the first forward
        # pass on, in a working copy besides (measured: twice the weights resident)
        return 2 * weights + chunk + max(forward, centred), 0

    def reduce_bytes(self, units: list[Unit]) -> list[tuple[int, int]]:
        """(device, host) working memory of the result step's phases. Correlations: a row
        layer's block on the merged halves and its scaled copy. Rotated baselines: three
        rotated blocks (both halves' and their merge), the rotated variances' product and the
        rotation. A Haar draw, on the device: the generator's temporaries, then the Gaussian,
        its copy, Q and R in the QR's precision and the rotation, beside the last rotation."""
        layout = self.layout
        d_max = max(max(s) for s in self.layer_sizes)
        cols = max(sum(s) for s in self.layer_sizes)
        phases = [(BYTES * 2 * d_max * cols, 0)]
        rotated = max((self.layer_sizes[m][k] for m, k in layout.rotated_layers(units)), default=0)
        if rotated:
            # a reference column model's neurons against a rotated row layer: blocks of all its columns
            width = cols if any(u.col_model in self.references for u in units) else rotated
            square = rotated * rotated
            phases.append((BYTES * (3 * width * rotated + 3 * square), 0))
            phases.append((BYTES * square + draw_bytes(rotated, self.device), 0))
        return phases

    def pass_bytes(self, units: list[Unit]) -> int:
        """Peak memory of one pass over `units` on the engine's device (on the CPU, all of it):
        accumulators and statistics, and the most working memory of one of its phases."""
        on_cpu = self.device.type == "cpu"
        working = max(device + (host if on_cpu else 0) for device, host in self.phases(units))
        return self.accumulator_bytes(units) + self.statistics_bytes(units) + working

    def host_bytes(self, units: list[Unit]) -> int:
        """Peak host memory of a pass over `units` on a GPU besides the device's (0 on the CPU,
        where pass_bytes holds it)."""
        if self.device.type == "cpu":
            return 0
        return max(host for _, host in self.phases(units))

    def least_memory(self) -> int:
        """The smallest memory budget the work can be planned for: a pass holding one row layer
        of a pair, the largest such."""
        return max(self.pass_bytes([Unit(row, (layer,), col)])
                   for row, col in self.layout.pairs() for layer in range(len(self.layer_sizes[row])))

    # ---- passes and groups ----------------------------------------------------------
    def _plan(self) -> list[list[Unit]]:
        """Group the work into passes that each fit the memory budget: the row layers of every
        pair, in order, join the current pass while it fits (consecutive row layers of a pair
        forming one unit), so no pass is left part empty where a pair ends."""
        need = self.least_memory()
        if need > self.memory_budget:
            raise MemoryBudgetError(f"the correlation engine needs at least {need / 2**30:.2f} GiB but "
                                    f"CORR_MEMORY allows {self.memory_budget / 2**30:.2f} GiB; raise CORR_MEMORY")
        passes: list[list[Unit]] = []
        current: list[tuple[int, int, int]] = []
        for row, col in self.layout.pairs():
            for layer in range(len(self.layer_sizes[row])):
                if current and self.pass_bytes(units_of(current + [(row, layer, col)])) > self.memory_budget:
                    passes.append(units_of(current))
                    current = []
                current.append((row, layer, col))
        passes.append(units_of(current))
        return passes

    def groups(self, parallel: int = 1) -> list[list[Unit]]:
        """The passes, split further until there are `parallel` groups (or the heaviest group
        is one row layer of one pair): each group is one pass over the tokens of its own, so
        separate tasks (workers, GPUs, hosts) can stream them at once, at the cost of one more
        read of the activations per extra group. The heaviest group is halved by work, keeping
        the order of (pair, row layer): the results do not depend on the grouping."""
        groups = [list(p) for p in self.passes]
        while len(groups) < parallel:
            heaviest = max(range(len(groups)), key=lambda i: self.accumulator_bytes(groups[i]))
            rows = [(u.row_model, l, u.col_model) for u in groups[heaviest] for l in u.row_layers]
            if len(rows) < 2:
                break
            work = np.cumsum([self.unit_bytes(Unit(r, (l,), c)) for r, l, c in rows])
            half = work[-1] / 2
            i = int(np.searchsorted(work, half))  # the first i + 1 rows hold half the work or more
            cut = i + 1 if i == 0 or work[i] - half <= half - work[i - 1] else i
            cut = min(max(cut, 1), len(rows) - 1)
            groups[heaviest:heaviest + 1] = [units_of(rows[:cut]), units_of(rows[cut:])]
        return groups

    # ---- reads and work ---------------------------------------------------------------
    def activation_bytes(self, n_tokens: int, needed: list[set[int]] | None = None) -> int:
        """Bytes of `n_tokens` rows of every model with a layer in `needed` (default all):
        a chunk's size, or with every token the activation caches'."""
        return BYTES * n_tokens * self.layout.width(needed)

    def bytes_read(self, units: list[Unit], n_tokens: int) -> int:
        """Activation-cache bytes a task for `units` reads: its layers' columns of every token."""
        neurons = sum(self.layer_sizes[m][l] for m, layers in enumerate(self.layout.needed_layers(units))
                      for l in layers)
        return BYTES * n_tokens * neurons

    def stream_flops(self, units: list[Unit], n_tokens: int) -> float:
        """GEMM work of streaming `n_tokens` rows for `units`: their co-moments, and the full
        within-layer co-moments of the rotated models' layers they read (as the stream counts it)."""
        cross = sum(self.unit_bytes(u) // (HALVES * BYTES) for u in units)  # rows x cols
        within = sum(self.layer_sizes[m][l] ** 2 for m, layers in enumerate(self.layout.needed_layers(units))
                     if self.layout.rotated(m) for l in layers)
        return 2.0 * n_tokens * (cross + within)

    def forward_flops(self, units: list[Unit], n_tokens: int) -> float:
        """Work of the forward passes the no-cache feed runs for `units` (2 FLOPs per weight and
        token, an upper bound: the unembedding is not run), 0 from caches."""
        if self.feed is None:
            return 0.0
        needed = self.layout.needed_layers(units)
        return 2.0 * n_tokens * sum(f.weight_bytes / BYTES for f, layers in zip(self.feed.models, needed) if layers)

    def reduce_flops(self, units: list[Unit]) -> float:
        """GEMM work of the result step for `units`: per baseline sample and rotated layer,
        the rotated variances diag(Q^T S Q) of both halves and the co-moment blocks times Q.
        The Haar draws themselves (QR factorisations) are counted by rotation_sizes."""
        layout, total = self.layout, 0.0
        for m, k in layout.rotated_layers(units):
            d = self.layer_sizes[m][k]
            total += HALVES * 2.0 * d ** 3
            for u in layout.rotation_users(units, m, k):
                if u.col_model == m and u.row_model in self.references:
                    total += HALVES * 2.0 * layout.unit_rows(u) * d * d
                if u.row_model == m and k in u.row_layers and u.col_model in self.references:
                    total += HALVES * 2.0 * sum(self.layer_sizes[u.col_model]) * d * d
        return self.n_rotations * total

    def rotation_sizes(self, units: list[Unit]) -> list[int]:
        """The size of every Haar rotation a pass over `units` draws (one QR each)."""
        return [self.layer_sizes[m][k] for m, k in self.layout.rotated_layers(units) for _ in range(self.n_rotations)]
