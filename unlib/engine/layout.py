"""Where each layer's neurons are among a model's columns, the units of work (co-moment
blocks of a model pair) and which layers a pass over them reads and rotates."""
from __future__ import annotations

import dataclasses

import numpy as np

HALVES = 2
FULL = HALVES  # index of the full sample next to the halves (0: A, 1: B)
BYTES = 4  # float32 accumulators and activations


@dataclasses.dataclass(frozen=True)
class Unit:
    """One accumulator: the co-moment of a block of `row_model`'s layers with every layer
    of `col_model`. It serves both directions of the pair (symmetry)."""

    row_model: int
    row_layers: tuple[int, ...]
    col_model: int


def units_of(rows: list[tuple[int, int, int]]) -> list[Unit]:
    """(row model, row layer, col model) triples, in order, as units of consecutive layers."""
    units: list[Unit] = []
    for r, l, c in rows:
        last = units[-1] if units else None
        if last and (last.row_model, last.col_model) == (r, c) and last.row_layers[-1] == l - 1:
            units[-1] = Unit(r, (*last.row_layers, l), c)
        else:
            units.append(Unit(r, (l,), c))
    return units


class Layout:
    """The models' layer sizes and the reference models: what every step of the engine
    shares about where a neuron's column is and which layers a baseline rotates."""

    def __init__(self, layer_sizes: list[list[int]], references: list[int] | int = 0):
        self.layer_sizes = layer_sizes
        self.references = [references] if isinstance(references, int) else sorted(references)
        self.offsets = [np.concatenate([[0], np.cumsum(sizes)]).astype(int) for sizes in layer_sizes]

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

    def all_layers(self) -> list[set[int]]:
        """Every layer of every model, as `needed` sets."""
        return [set(range(len(sizes))) for sizes in self.layer_sizes]

    def width(self, needed: list[set[int]] | None = None) -> int:
        """Neurons in a row of a chunk: every layer of each model with a layer in `needed`
        (default all models), since a chunk holds whole models."""
        needed = needed or self.all_layers()
        return sum(sum(sizes) for sizes, layers in zip(self.layer_sizes, needed) if layers)

    def needed_layers(self, units: list[Unit]) -> list[set[int]]:
        """The layers a pass over `units` reads: each unit's row layers and every layer of its
        column model."""
        needed = [set() for _ in self.layer_sizes]
        for u in units:
            needed[u.row_model].update(u.row_layers)
            needed[u.col_model].update(range(len(self.layer_sizes[u.col_model])))
        return needed

    def unit_rows(self, unit: Unit) -> int:
        """Rows of the unit's co-moment block: the neurons of its row layers."""
        return sum(self.layer_sizes[unit.row_model][l] for l in unit.row_layers)

    def layer_slice(self, model: int, layer: int) -> slice:
        """The columns of `model`'s `layer` among all of the model's neurons."""
        return slice(int(self.offsets[model][layer]), int(self.offsets[model][layer + 1]))

    def rotated(self, model: int) -> bool:
        """Whether some rotated baseline rotates `model`'s layers (another model is a
        reference), so that its full within-layer co-moments are needed, not only their
        diagonal (the variances)."""
        return any(ref != model for ref in self.references)

    def rotation_users(self, units: list[Unit], model: int, layer: int) -> list[Unit]:
        """The units whose baselines rotate `model`'s `layer`: a reference's rows against it
        (it is in the column model), or a reference column model against it (a row layer)."""
        return [u for u in units if (u.col_model == model and u.row_model in self.references)
                or (u.row_model == model and layer in u.row_layers and u.col_model in self.references)]

    def rotated_layers(self, units: list[Unit]) -> list[tuple[int, int]]:
        """(model, layer) of every layer a pass over `units` rotates, once per baseline sample."""
        return [(m, k) for m, sizes in enumerate(self.layer_sizes) for k in range(len(sizes))
                if self.rotation_users(units, m, k)]
