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
from typing import Iterable

import h5py
import numpy as np
import pandas as pd
import torch

from unlib.store import write_small_h5


class CoMoments:
    """Running means, per-x-neuron squared deviations and centred cross-product of two
    activation streams, merged chunk by chunk with Chan et al.'s parallel update.
    With `symmetric=True` the y stream is the x stream (a within-layer co-moment)."""

    def __init__(self, n_x: int, n_y: int, device: str | torch.device = "cpu", symmetric: bool = False):
        self.symmetric = symmetric
        self.n = 0
        self.mean_x = torch.zeros(n_x, device=device)
        self.mean_y = torch.zeros(n_y, device=device)
        self.m2_x = torch.zeros(n_x, device=device)
        self.cross = torch.zeros(n_x, n_y, device=device)

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        t = x.shape[0]
        if t == 0:
            return
        mx = x.mean(0)
        xc = x - mx
        if self.symmetric:
            my, yc = mx, xc
        else:
            my = y.mean(0)
            yc = y - my
        n_new = self.n + t
        dx = mx - self.mean_x
        dy = my - self.mean_y
        weight = self.n * t / n_new
        self.cross.addmm_(xc.T, yc)
        self.cross.addr_(dx, dy, alpha=weight)
        self.m2_x += (xc * xc).sum(0) + weight * dx * dx
        self.mean_x += dx * (t / n_new)
        self.mean_y += dy * (t / n_new)
        self.n = n_new


def haar_orthogonal(n: int, seed: Iterable[int] | int) -> torch.Tensor:
    """A Haar-distributed n x n orthogonal matrix (QR of a Gaussian matrix with the signs
    of R's diagonal moved into Q), float64 on the CPU, reproducible from `seed`."""
    state = np.random.SeedSequence(seed).generate_state(2)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    gaussian = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))


def _safe_corr(cov: torch.Tensor, var_x: torch.Tensor, var_y: torch.Tensor) -> torch.Tensor:
    """cov / sqrt(var_x var_y), with 0 where a neuron is constant over the tokens."""
    denom = torch.sqrt(var_x[:, None].clamp_min(0) * var_y[None, :].clamp_min(0))
    return torch.where(denom > 0, cov / denom.clamp_min(1e-30), torch.zeros((), device=cov.device))


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

    @classmethod
    def load(cls, path) -> "LayerResult":
        with h5py.File(path, "r") as f:
            return cls(layer=int(f.attrs["layer"]), others=[int(i) for i in f.attrs["other_index"]],
                       **{name: f[name][:] for name in cls.ARRAYS})


class ExcessCorrelationEngine:
    """Accumulates, in one pass over the tokens, what the max and rotated-baseline
    correlations of every reference neuron against every other model need.

    Feed it chunks as chunk[model][layer] -> (tokens, d_mlp) float32 tensors."""

    def __init__(self, layer_sizes: list[list[int]], reference: int = 0, n_rotations: int = 5,
                 rotation_seed: int = 0, device: str | torch.device = "cpu"):
        self.layer_sizes = layer_sizes
        self.reference = reference
        self.n_rotations = n_rotations
        self.rotation_seed = rotation_seed
        self.device = device
        self.others = [m for m in range(len(layer_sizes)) if m != reference]
        d_ref = sum(layer_sizes[reference])
        self.cross = {m: CoMoments(d_ref, sum(layer_sizes[m]), device) for m in self.others}
        self.within = {m: [CoMoments(d, d, device, symmetric=True) for d in layer_sizes[m]] for m in self.others}
        self.n_tokens = 0

    def update(self, chunk: list[list[torch.Tensor]]) -> None:
        x = torch.cat(chunk[self.reference], dim=1)
        for m in self.others:
            self.cross[m].update(x, torch.cat(chunk[m], dim=1))
            for acc, y in zip(self.within[m], chunk[m]):
                acc.update(y)
        self.n_tokens += x.shape[0]

    def rotation(self, model: int, layer: int, sample: int) -> torch.Tensor:
        """The recorded-seed rotation of `model`'s `layer` for baseline sample `sample`."""
        d = self.layer_sizes[model][layer]
        q = haar_orthogonal(d, [self.rotation_seed, model, layer, sample])
        return q.to(device=self.device, dtype=torch.float32)

    def results(self) -> list[LayerResult]:
        """One LayerResult per reference layer."""
        ref_sizes = self.layer_sizes[self.reference]
        ref_offsets = np.concatenate([[0], np.cumsum(ref_sizes)])
        per_layer = {l: {"max": [], "layer": [], "neuron": [], "base": []} for l in range(len(ref_sizes))}
        for m in self.others:
            acc = self.cross[m]
            sizes = self.layer_sizes[m]
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            covs = [w.cross for w in self.within[m]]
            var_y = torch.cat([torch.diagonal(s) for s in covs])
            rotations = [[self.rotation(m, l, r) for l in range(len(sizes))] for r in range(self.n_rotations)]
            rotated_var = [[((s @ q) * q).sum(0) for s, q in zip(covs, qs)] for qs in rotations]
            for l in range(len(ref_sizes)):
                rows = slice(int(ref_offsets[l]), int(ref_offsets[l + 1]))
                cross, var_x = acc.cross[rows], acc.m2_x[rows]
                corr = _safe_corr(cross, var_x, var_y)
                best, where = corr.max(dim=1)
                where = where.cpu().numpy()
                layer_of = np.searchsorted(offsets, where, side="right") - 1
                base = []
                for qs, rvars in zip(rotations, rotated_var):
                    best_rot = torch.full_like(best, -np.inf)
                    for k, (q, rv) in enumerate(zip(qs, rvars)):
                        cols = slice(int(offsets[k]), int(offsets[k + 1]))
                        rot_corr = _safe_corr(cross[:, cols] @ q, var_x, rv)
                        best_rot = torch.maximum(best_rot, rot_corr.max(dim=1).values)
                    base.append(best_rot.cpu().numpy())
                out = per_layer[l]
                out["max"].append(best.cpu().numpy())
                out["layer"].append(layer_of)
                out["neuron"].append(where - offsets[layer_of])
                out["base"].append(np.stack(base))
        return [LayerResult(layer=l, others=list(self.others), max_corr=np.stack(v["max"]),
                            max_layer=np.stack(v["layer"]), max_neuron=np.stack(v["neuron"]),
                            baseline_max_corr=np.stack(v["base"]))
                for l, v in per_layer.items()]


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


def run_engine(chunks: Iterable[list[list[torch.Tensor]]], layer_sizes: list[list[int]], reference: int = 0,
               n_rotations: int = 5, rotation_seed: int = 0, device: str = "cpu",
               progress=None) -> list[LayerResult]:
    """Stream `chunks` through an ExcessCorrelationEngine and return its per-layer results."""
    engine = ExcessCorrelationEngine(layer_sizes, reference, n_rotations, rotation_seed, device)
    for chunk in chunks:
        engine.update(chunk)
        if progress is not None:
            progress(engine.n_tokens)
    return engine.results()


class MemoryEfficientExcessCorrelationComputer:
    """Excess correlations of a reference model's neurons against loaded models, computed
    without an activation cache: every model runs on the same token batch and the
    activations (rounded to float16, as a cache would store them) feed the engine."""

    def __init__(self, models: list, device: str | torch.device = "cpu", model_names: list[str] | None = None):
        self.models = models
        self.device = device
        self.model_names = model_names or [f"model_{i}" for i in range(len(models))]

    def compute_results(self, dataset, reference: int = 0, n_rotations: int = 5, rotation_seed: int = 0,
                        batch_size: int = 32) -> list[LayerResult]:
        from unlib.activations import model_chunks

        tokens = np.asarray(dataset.cpu() if isinstance(dataset, torch.Tensor) else dataset)
        sizes = [[m.cfg.d_mlp] * m.cfg.n_layers for m in self.models]
        return run_engine(model_chunks(self.models, tokens, batch_size, self.device), sizes, reference,
                          n_rotations, rotation_seed, self.device)

    def compute_excess_correlations_for_all_neurons(self, dataset, reference: int = 0, n_rotations: int = 5,
                                                    rotation_seed: int = 0, batch_size: int = 32) -> pd.DataFrame:
        """`dataset`: token ids (n_sequences, ctx_len), BOS in column 0 (excluded from the
        correlations). Returns the excess-correlation table of the reference model."""
        results = self.compute_results(dataset, reference, n_rotations, rotation_seed, batch_size)
        return excess_tables(results, self.model_names)[0]
