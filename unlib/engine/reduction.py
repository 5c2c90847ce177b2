"""The result step of a pass: its co-moments turned into each reference neuron's max
correlation (and where it is) and its max against every rotated layer, on each half of the
rows and on all of them (the halves' Chan merge, one block at a time)."""
from __future__ import annotations

import numpy as np
import torch

from unlib.engine.comoments import CoMoments, inverse_std
from unlib.engine.layout import FULL, HALVES, Unit
from unlib.engine.results import PassStats
from unlib.engine.rotations import layer_rotations


class BestMatches:
    """A pass's partial best matches as PassResult entries, {(reference, reference layer,
    other model): entry}, kept as the result step finds larger correlations."""

    def __init__(self, layer_sizes: list[list[int]], n_rotations: int):
        self.layer_sizes = layer_sizes
        self.n_rotations = n_rotations
        self.entries: dict[tuple[int, int, int], dict[str, np.ndarray]] = {}

    def keep_max(self, ref: int, layer: int, other: int, variant: int, values: torch.Tensor, layer_idx,
                 neuron_idx) -> None:
        """Keep the larger max correlation for (ref, layer, other) on `variant`, and on the
        full sample where it is."""
        key = (ref, layer, other)
        values = values.cpu().numpy()
        if key not in self.entries:
            d = self.layer_sizes[ref][layer]
            self.entries[key] = {"max": np.full((HALVES + 1, d), -np.inf, dtype=np.float32),
                                 "layer": np.zeros(d, dtype=np.int64), "neuron": np.zeros(d, dtype=np.int64),
                                 "base": np.full((HALVES + 1, self.n_rotations, d), -np.inf, dtype=np.float32)}
        entry = self.entries[key]
        if variant < HALVES:
            np.maximum(entry["max"][variant], values, out=entry["max"][variant])
            return
        better = values > entry["max"][FULL]
        entry["max"][FULL][better] = values[better]
        entry["layer"][better] = np.asarray(layer_idx)[better] if np.ndim(layer_idx) else layer_idx
        entry["neuron"][better] = neuron_idx[better]

    def keep_baseline(self, ref: int, layer: int, other: int, variant: int, sample: int,
                      values: torch.Tensor) -> None:
        """Keep the larger max correlation against rotation `sample` of `other`."""
        entry = self.entries[(ref, layer, other)]
        np.maximum(entry["base"][variant, sample], values.cpu().numpy(), out=entry["base"][variant, sample])


def reduce_pass(moments: CoMoments, units: list[Unit], n_rotations: int, rotation_seed: int,
                stats: PassStats) -> dict[tuple[int, int, int], dict[str, np.ndarray]]:
    """Turn a pass's co-moments into (partial) max and baseline correlations, on each
    half and on all rows: PassResult entries, without "dead"."""
    layout = moments.layout
    best = BestMatches(layout.layer_sizes, n_rotations)
    for u, acc in moments.cross.items():
        max_correlations(moments, u, acc, best)
    draws = [(m, k, r) for r in range(n_rotations) for m, k in layout.rotated_layers(units)]
    for (m, k, r), (q, seconds) in zip(draws, layer_rotations(layout.layer_sizes, rotation_seed, draws,
                                                              moments.device)):
        stats.rotation_seconds += seconds
        s = moments.within[m][k]
        # diag(Q^T S Q) per half; the full sample's follows from the Chan merge
        var = [((s[h] @ q) * q).sum(0) for h in range(HALVES)]
        var.append(var[0] + var[1] + moments.merge_weight * (moments.shift[m][layout.layer_slice(m, k)] @ q) ** 2)
        rotated_inv_std = [inverse_std(v) for v in var]
        for u in layout.rotation_users(units, m, k):
            rotated_baselines(moments, u, m, k, r, q, rotated_inv_std, best)
    return best.entries


def max_correlations(moments: CoMoments, u: Unit, acc: torch.Tensor, best: BestMatches) -> None:
    """The unit's correlations, each row layer's block on half A, half B and all rows: the
    max of every reference neuron against the other model, both ways where both are
    references."""
    layout, weight, shift = moments.layout, moments.merge_weight, moments.shift
    row, col = u.row_model, u.col_model
    base = int(layout.offsets[row][u.row_layers[0]])
    col_off = layout.offsets[col]
    for l in u.row_layers:
        rows = layout.layer_slice(row, l)
        local = slice(rows.start - base, rows.stop - base)
        full = acc[0, local] + acc[1, local]
        full.addr_(shift[row][rows], shift[col], alpha=weight)
        for variant, block in enumerate([acc[0, local], acc[1, local], full]):
            # two scalings, the first into a new tensor: the accumulator is left as it is
            corr = block.mul(moments.inv_std(row, variant)[rows, None]).mul_(moments.inv_std(col, variant))
            if row in layout.references:
                values, where = corr.max(dim=1)
                where = where.cpu().numpy()
                layer_of = np.searchsorted(col_off, where, side="right") - 1
                best.keep_max(row, l, col, variant, values, layer_of, where - col_off[layer_of])
            if col in layout.references:
                values, where = corr.max(dim=0)
                for k in range(len(layout.layer_sizes[col])):
                    cols = layout.layer_slice(col, k)
                    best.keep_max(col, k, row, variant, values[cols], l, where[cols].cpu().numpy())
            del corr


def rotated_baselines(moments: CoMoments, u: Unit, m: int, k: int, r: int, q: torch.Tensor,
                      rotated_inv_std: list[torch.Tensor], best: BestMatches) -> None:
    """Baselines against rotated layer k of model m, on each half and on all rows: the
    merge commutes with the rotation, (C_A + C_B + w outer(a, b)) Q = C_A Q + C_B Q
    + w outer(a, Q^T b), so the full sample costs no matmul of its own."""
    layout, weight, shift, acc = moments.layout, moments.merge_weight, moments.shift, moments.cross[u]
    row, col = u.row_model, u.col_model
    base = int(layout.offsets[row][u.row_layers[0]])
    if m == col and row in layout.references:  # the row model's neurons against rotated layer k of col
        cols = layout.layer_slice(col, k)
        rotated_shift = shift[col][cols] @ q
        for l in u.row_layers:  # one row layer at a time, as in the stream (bitwise the same in any split)
            rows = layout.layer_slice(row, l)
            local = slice(rows.start - base, rows.stop - base)
            blocks = [acc[h][local, cols] @ q for h in range(HALVES)]
            blocks.append(blocks[0] + blocks[1])
            blocks[FULL].addr_(shift[row][rows], rotated_shift, alpha=weight)
            for variant, block in enumerate(blocks):
                rot = block.mul_(moments.inv_std(row, variant)[rows, None]).mul_(rotated_inv_std[variant])
                best.keep_baseline(row, l, col, variant, r, rot.amax(dim=1))
    if m == row and k in u.row_layers and col in layout.references:  # col's neurons against rotated row layer k
        rows = layout.layer_slice(row, k)
        local = slice(rows.start - base, rows.stop - base)
        blocks = [acc[h][local].T @ q for h in range(HALVES)]
        blocks.append(blocks[0] + blocks[1])
        blocks[FULL].addr_(shift[col], shift[row][rows] @ q, alpha=weight)
        for variant, block in enumerate(blocks):
            rot = block.mul_(moments.inv_std(col, variant)[:, None]).mul_(rotated_inv_std[variant]).amax(dim=1)
            for j in range(len(layout.layer_sizes[col])):
                best.keep_baseline(col, j, row, variant, r, rot[layout.layer_slice(col, j)])
