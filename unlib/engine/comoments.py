"""The stream: one pass over the tokens accumulates, per half of the rows, the co-moments of
its units and the within-layer co-moments of every layer it reads, with Chan's parallel
update; then the statistics the result step needs (variances, constant neurons, the halves'
mean shift)."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import numpy as np
import torch

from unlib.engine.halves import BLOCKS, HalfSplit
from unlib.engine.layout import FULL, HALVES, Layout, Unit
from unlib.engine.precision import Products
from unlib.engine.results import PassStats

# chunks(needed) -> per chunk, per model (tokens, all of the model's neurons) or None
Feed = Callable[[list[set[int]]], Iterable[list[torch.Tensor | None]]]


def inverse_std(var: torch.Tensor) -> torch.Tensor:
    """1/sqrt(var), and 0 for a neuron that is constant over the tokens (its correlations
    are then 0 rather than NaN)."""
    return torch.where(var > 0, var.clamp_min(1e-30).rsqrt(), torch.zeros((), device=var.device))


@dataclasses.dataclass
class CoMoments:
    """A pass's running statistics, created per pass: per unit its co-moment block
    [half, rows, cols] (`cross`); per read layer its within-layer co-moments [half, d, d], or
    only their diagonal [half, d] for a model no baseline rotates (`within`); per half the
    means and row counts; per half and model each neuron's smallest and largest value (equal:
    constant). After the stream, `shift` holds per model mean(half B) - mean(half A)."""

    layout: Layout
    device: torch.device
    products: Products
    needed: list[set[int]]
    cross: dict[Unit, torch.Tensor]
    within: list[list[torch.Tensor | None]]
    means: list[list[torch.Tensor]]
    counts: list[int]
    low: list[list[torch.Tensor | None]]
    high: list[list[torch.Tensor | None]]
    shift: list[torch.Tensor] = dataclasses.field(default_factory=list)
    # 1/std per (model, variant), each computed once, when the result step first asks
    inv_stds: dict[tuple[int, int], torch.Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def zeros(cls, layout: Layout, units: list[Unit], products: Products) -> "CoMoments":
        """Empty accumulators for a pass over `units`, its products computed by `products`."""
        device = products.device
        needed = layout.needed_layers(units)
        cross = {u: torch.zeros(HALVES, layout.unit_rows(u), sum(layout.layer_sizes[u.col_model]), device=device)
                 for u in units}
        # the full co-moment where a baseline rotates the model, else only its diagonal
        within = [[torch.zeros(HALVES, *((d, d) if layout.rotated(m) else (d,)), device=device)
                   if l in needed[m] else None
                   for l, d in enumerate(sizes)] for m, sizes in enumerate(layout.layer_sizes)]
        means = [[torch.zeros(int(off[-1]), device=device) for off in layout.offsets] for _ in range(HALVES)]
        n_models = len(layout.layer_sizes)
        return cls(layout, device, products, needed, cross, within, means, [0] * HALVES,
                   [[None] * n_models for _ in range(HALVES)], [[None] * n_models for _ in range(HALVES)])

    def add_rows(self, part: list[torch.Tensor | None], half: int, stats: PassStats) -> None:
        """Merge rows of one block into half `half`'s co-moments and means."""
        layout, n = self.layout, self.counts[half]
        t = next(a.shape[0] for a, layers in zip(part, self.needed) if layers)
        scale = math.sqrt(n * t / (n + t))
        centred = []
        for m, layers in enumerate(self.needed):
            if not layers:
                centred.append(None)
                continue
            # two reads, yet 5x faster than torch.aminmax along dim 0 on the CPU (torch 2.13)
            low, high = part[m].amin(0), part[m].amax(0)
            if self.low[half][m] is not None:
                low, high = torch.minimum(self.low[half][m], low), torch.maximum(self.high[half][m], high)
            self.low[half][m], self.high[half][m] = low, high
            mean = part[m].mean(0)
            delta = mean - self.means[half][m]
            # The centred rows plus one row sqrt(n t / (n + t)) * delta: one GEMM then also adds
            # Chan's correction n t / (n + t) * outer(delta), sparing a rank-1 sweep of the
            # accumulator per block-bounded run.
            x = torch.empty(t + 1, part[m].shape[1], device=self.device)
            torch.sub(part[m], mean, out=x[:t])
            torch.mul(delta, scale, out=x[t])
            if not layout.rotated(m):  # only the variances are used: the diagonal, from the float32 rows
                for l in sorted(layers):
                    x_l = x[:, layout.layer_slice(m, l)]
                    self.within[m][l][half].add_((x_l * x_l).sum(0))
            centred.append(self.products.operand(x))
            self.means[half][m] += delta * (t / (n + t))
        # One GEMM per row layer, whatever the unit's block of layers: every product then has
        # the same shape however the work is split into units, passes and tasks, so the
        # results are bitwise the same.
        with self.products.switches():
            for u, acc in self.cross.items():
                base = int(layout.offsets[u.row_model][u.row_layers[0]])
                for l in u.row_layers:
                    rows = layout.layer_slice(u.row_model, l)
                    self.products.add(acc[half][rows.start - base:rows.stop - base],
                                      Products.columns(centred[u.row_model], rows), centred[u.col_model])
                stats.flops += 2.0 * t * acc[half].numel()
            for m, layers in enumerate(self.needed):
                if not layout.rotated(m):
                    continue
                for l in sorted(layers):
                    x = Products.columns(centred[m], layout.layer_slice(m, l))
                    self.products.add(self.within[m][l][half], x, x)
                    stats.flops += 2.0 * t * layout.layer_sizes[m][l] ** 2
        self.counts[half] += t

    def finish(self) -> None:
        """After the last rows: the halves' mean shift, and the within-layer co-moments and
        mean shifts of constant neurons zeroed (rounding noise), so that the rotated
        baselines' variances hold none of it either."""
        self.shift = [b - a for a, b in zip(*self.means)]
        for m, layers in enumerate(self.needed):
            if not layers:
                continue
            flat = [self.constant(m, h) for h in range(HALVES)]
            self.shift[m][self.constant(m, FULL)] = 0
            for l in layers:
                cols = self.layout.layer_slice(m, l)
                for h in range(HALVES):
                    dead = flat[h][cols]
                    self.within[m][l][h][dead] = 0
                    if self.layout.rotated(m):
                        self.within[m][l][h][:, dead] = 0

    @property
    def merge_weight(self) -> float:
        """n_A n_B / n: the weight of the outer product of the halves' mean difference in
        the Chan merge C = C_A + C_B + n_A n_B / n * outer(mean_B - mean_A)."""
        n_a, n_b = self.counts
        return n_a * n_b / max(n_a + n_b, 1)

    def constant(self, model: int, variant: int) -> torch.Tensor:
        """Which neurons of `model` are constant (every value equal) on half A (0), half B (1)
        or all rows (FULL): compared exactly, so the rounding of float32 means cannot give
        them a tiny variance and noise correlations. A half without rows: all constant."""
        halves = [h for h in range(HALVES) if self.low[h][model] is not None and (variant == FULL or h == variant)]
        if not halves:
            return torch.ones(int(self.layout.offsets[model][-1]), dtype=torch.bool, device=self.device)
        low = torch.stack([self.low[h][model] for h in halves]).amin(0)
        high = torch.stack([self.high[h][model] for h in halves]).amax(0)
        return low == high

    def dead(self, model: int, layer: int) -> np.ndarray:
        """Which neurons of `model`'s `layer` are constant over all the rows (dead)."""
        return self.constant(model, FULL)[self.layout.layer_slice(model, layer)].cpu().numpy()

    def inv_std(self, model: int, variant: int) -> torch.Tensor:
        """1/std of every neuron of `model` on half A (0), half B (1) or all rows (FULL); 0
        for a constant neuron."""
        key = (model, variant)
        if key not in self.inv_stds:
            # layers this pass does not read have no co-moments: variance 0 (never used)
            halves = torch.cat([torch.zeros(HALVES, d, device=self.device) if s is None else
                                torch.diagonal(s, dim1=-2, dim2=-1) if self.layout.rotated(model) else s
                                for s, d in zip(self.within[model], self.layout.layer_sizes[model])], dim=1)
            var = halves[variant] if variant < HALVES else \
                halves.sum(0) + self.merge_weight * self.shift[model] ** 2
            self.inv_stds[key] = inverse_std(torch.where(self.constant(model, variant), 0.0, var))
        return self.inv_stds[key]


def stream(layout: Layout, chunks: Feed, units: list[Unit], products: Products, stats: PassStats,
           progress: Callable[[PassStats], None] | None = None, split: HalfSplit = BLOCKS) -> CoMoments:
    """One pass over the tokens: Chan-merged co-moments of every unit and the within-layer
    co-moments of every layer the units need, per half of `split`, with the products in
    `products`' precision, finished for the result step. `progress(stats)` follows each chunk."""
    moments = CoMoments.zeros(layout, units, products)
    row = 0
    for chunk in chunks(moments.needed):
        t = next(a.shape[0] for a, layers in zip(chunk, moments.needed) if layers)
        for half, lo, hi in split.segments(row, t):
            moments.add_rows([None if a is None else a[lo:hi] for a in chunk], half, stats)
        row += t
        stats.tokens += t
        if progress is not None:
            progress(stats)
        del chunk  # let the feed reuse its memory for the next chunk (the plan counts one in use)
    moments.finish()
    return moments
