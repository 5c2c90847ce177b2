"""What the engine returns: a pass's partial best matches (PassResult, saved by each
correlation block) and what it cost (PassStats); merged in plan order and collected into one
LayerResult per reference layer."""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from unlib.engine.halves import MIN_HALF_ROWS
from unlib.engine.layout import FULL, HALVES
from unlib.h5read import H5Reader, read_h5
from unlib.h5write import write_h5

# max_layer and max_neuron of a dead reference neuron (constant over the analysed tokens):
# it has no best match. Its correlations, baselines and excess are 0.
DEAD_MATCH = -1


@dataclasses.dataclass
class LayerResult:
    """Correlations of one reference layer's neurons against each other model:
    arrays are indexed [other model, neuron] (baseline: [other model, rotation, neuron]);
    the *_halves arrays hold the same on half A and half B of the rows, [half, ...], NaN
    unless each half holds MIN_HALF_ROWS rows; `half_rows`: the rows in each half (None:
    taken as equal)."""

    layer: int
    others: list[int]
    max_corr: np.ndarray
    max_layer: np.ndarray
    max_neuron: np.ndarray
    baseline_max_corr: np.ndarray
    max_corr_halves: np.ndarray
    baseline_max_corr_halves: np.ndarray
    half_rows: tuple[int, int] | None = None

    ARRAYS = ("max_corr", "max_layer", "max_neuron", "baseline_max_corr", "max_corr_halves",
              "baseline_max_corr_halves")

    def save(self, path, attrs: dict) -> None:
        """Write atomically to an HDF5 file, with `attrs` as provenance."""
        write_h5(path, {name: getattr(self, name) for name in self.ARRAYS},
                 {**attrs, "layer": self.layer, "other_index": self.others,
                  **({} if self.half_rows is None else {"half_rows": list(self.half_rows)})})

    @staticmethod
    def attributes(path) -> dict:
        """The provenance and timing attributes saved with a result."""
        with H5Reader(path) as reader:
            return reader.attrs

    @classmethod
    def load(cls, path) -> "LayerResult":
        arrays, attrs = read_h5(path)
        half_rows = tuple(int(n) for n in attrs["half_rows"]) if "half_rows" in attrs else None
        return cls(layer=int(attrs["layer"]), others=[int(i) for i in attrs["other_index"]],
                   **{name: arrays[name] for name in cls.ARRAYS}, half_rows=half_rows)


@dataclasses.dataclass
class PassStats:
    """What a pass cost, counted as it runs (`progress` sees the stream's so far)."""

    flops: float = 0.0  # co-moment GEMM work streamed
    tokens: int = 0  # token rows streamed
    stream_seconds: float = 0.0
    reduce_seconds: float = 0.0  # turning co-moments into correlations, rotations included
    rotation_seconds: float = 0.0  # of which drawing Haar rotations

    @classmethod
    def total(cls, stats: Iterable["PassStats"]) -> "PassStats":
        """The sum of several passes' costs."""
        out = cls()
        for s in stats:
            for field in dataclasses.fields(cls):
                setattr(out, field.name, getattr(out, field.name) + getattr(s, field.name))
        return out


@dataclasses.dataclass
class PassResult:
    """One pass's partial best matches, {(reference, reference layer, other model): entry},
    each entry holding per variant (half A, half B, all rows) the max correlation ("max"),
    the max against each rotation ("base"), where the all-rows max is ("layer", "neuron"),
    and which reference neurons are constant ("dead"); and the rows in each half."""

    entries: dict[tuple[int, int, int], dict[str, np.ndarray]]
    half_rows: list[int]
    attrs: dict = dataclasses.field(default_factory=dict)  # what load() found saved with it
    stats: PassStats | None = None  # what the pass cost; None once loaded (its attrs say)

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
    halves' arrays are NaN unless each half holds MIN_HALF_ROWS rows."""
    out = {}
    for ref in references:
        others = [m for m in range(len(layer_sizes)) if m != ref]
        layers = []
        for l in range(len(layer_sizes[ref])):
            entries = [best[(ref, l, m)] for m in others]
            halves = np.stack([e["max"][:HALVES] for e in entries], axis=1)
            base_halves = np.stack([e["base"][:HALVES] for e in entries], axis=1)
            if min(half_rows) < MIN_HALF_ROWS:
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
                                      max_corr_halves=halves, baseline_max_corr_halves=base_halves,
                                      half_rows=(int(half_rows[0]), int(half_rows[1]))))
        out[ref] = layers
    return out


def combine(passes: Iterable[PassResult], layer_sizes: list[list[int]],
            references: list[int]) -> dict[int, list[LayerResult]]:
    """{reference: [LayerResult per layer]} from the results of every pass, in plan order
    (merged one at a time, so only one pass's entries are held besides the merge)."""
    best: dict = {}
    for result in passes:
        merge_partials(best, result.entries)
    return collect(best, layer_sizes, references, result.half_rows)
