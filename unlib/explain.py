"""Neurons explained by features of their tokens (Gurnee et al. 2024, Section 4): the share of a
neuron's activation variance that one binary feature f explains,

    VR(f) = [Var(a) - (n0/n) Var(a | f=0) - (n1/n) Var(a | f=1)] / Var(a)
          = (n0 n1 / n^2) (mean(a | f=1) - mean(a | f=0))^2 / Var(a),

for every feature of unlib.features and every neuron, from the MLP post-activations over the
analysed tokens, and each neuron's positional mutual information (how much its firing, a > 0,
tells of the position). Variances are population variances (the paper's pandas ddof=1 differs
by a factor (n-1)/n, nothing at these n)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse
from scipy.special import xlogy

from unlib.features import GROUP_FAMILY, TokenFeatures

# A feature seen on fewer analysed positions than this (or missing from fewer) explains nothing
# reliably: the paper kept unigrams seen > 3,000 times in 10M tokens (3e-4), at least 20 here.
MIN_FREQUENCY, MIN_COUNT = 3e-4, 20
EXPLAINED_VR = 0.05  # below this best VR a neuron's activation is unexplained (the paper's cut)
DEAD = "dead"  # the family of a neuron constant over the analysed tokens: nothing to explain
EXPLANATION_COLUMNS = ["layer", "neuron", "best_feature", "best_vr", "best_family", "second_feature", "second_vr",
                       "second_family", "positional_mi", "family"]


class FeatureMatrix:
    """The usable features of a TokenFeatures: per analysed position and variable the index of
    its feature among the usable ones (-1 for none), and the 0/1 (positions x features) sparse
    matrix of a slice of positions, built when it is read (the whole would take ~12 bytes per
    position and feature present)."""

    def __init__(self, features: TokenFeatures):
        n = len(features.positions)
        columns, names, groups, offset = [], [], [], 0
        floor = max(MIN_COUNT, int(np.ceil(MIN_FREQUENCY * n)))
        for variable in features.variables:
            counts = np.bincount(variable.codes[variable.codes >= 0], minlength=len(variable.names))
            usable = np.flatnonzero((counts >= floor) & (n - counts >= floor))
            if len(usable) == 0:
                continue
            new_index = np.full(len(variable.names), -1, dtype=np.int32)
            new_index[usable] = offset + np.arange(len(usable))
            columns.append(np.where(variable.codes >= 0, new_index[np.maximum(variable.codes, 0)], -1))
            names += [variable.names[i] for i in usable]
            groups += [variable.group] * len(usable)
            offset += len(usable)
        if not columns:
            raise ValueError(f"no token feature is present at {floor} of the {n} analysed positions and absent from "
                             f"as many: too few tokens to explain neurons")
        self.columns = np.stack(columns, axis=1).astype(np.int32)
        self.names, self.groups = names, groups
        self.families = [GROUP_FAMILY[g] for g in groups]
        self.counts = np.bincount(self.columns[self.columns >= 0], minlength=offset).astype(np.float64)
        self.positions = features.positions
        self.n = n

    def matrix(self, start: int, stop: int) -> scipy.sparse.csr_matrix:
        """The 0/1 (positions start..stop x features) matrix."""
        rows, variables = np.nonzero(self.columns[start:stop] >= 0)
        return scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, self.columns[start:stop][rows, variables])),
                                       shape=(stop - start, len(self.names)))


class VarianceReduction:
    """Streaming sums for one layer's VR and positional mutual information: add the layer's
    activations in row chunks (in the order of the features' positions), then `result()`."""

    def __init__(self, features: FeatureMatrix, d_mlp: int):
        self.features = features
        self.sums = np.zeros((len(features.names), d_mlp))
        self.fired = np.zeros((int(features.positions.max()) + 1, d_mlp))
        self.total = np.zeros(d_mlp)
        self.squares = np.zeros(d_mlp)
        self.shift = None
        self.done = 0

    def add(self, activations: np.ndarray) -> None:
        a = np.asarray(activations, dtype=np.float64)
        start, stop = self.done, self.done + len(a)
        if self.shift is None:
            self.shift = a.mean(0)
        self.sums += self.features.matrix(start, stop).T @ a
        at = scipy.sparse.csr_matrix((np.ones(len(a)), (np.arange(len(a)), self.features.positions[start:stop])),
                                     shape=(len(a), len(self.fired)))
        self.fired += at.T @ (a > 0)
        self.total += a.sum(0)
        self.squares += ((a - self.shift) ** 2).sum(0)
        self.done += len(a)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(VR (features, d_mlp), positional MI in nats (d_mlp,), dead (d_mlp,)): a dead neuron,
        constant over the analysed tokens, has VR 0 for every feature."""
        n = self.features.n
        if self.done != n:
            raise ValueError(f"{self.done} activation rows added for {n} analysed positions")
        mean = self.total / n
        var = self.squares / n - (mean - self.shift) ** 2
        n1 = self.features.counts[:, None]
        m1 = self.sums / n1
        m0 = (self.total - self.sums) / (n - n1)
        safe = np.where(var > 0, var, np.inf)
        vr = np.clip(n1 * (n - n1) / n ** 2 * (m1 - m0) ** 2 / safe, 0, 1)
        mi = positional_mi(self.fired, np.bincount(self.features.positions, minlength=len(self.fired)))
        return vr, mi, ~(var > 0)


def positional_mi(fired: np.ndarray, per_position: np.ndarray) -> np.ndarray:
    """I(fires; position) in nats per neuron from its firing counts per position (positions,
    neurons) and the rows at each position: the paper's positional mutual information, each
    position weighted by its share of the rows (the paper's uniform weights when all are equal)."""
    seen = per_position > 0
    fired, rows = fired[seen], per_position[seen][:, None].astype(float)
    p_t = fired / rows
    p = fired.sum(0) / rows.sum()
    weight = rows / rows.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        on = xlogy(p_t, p_t) - xlogy(p_t, np.broadcast_to(p, p_t.shape))
        off = xlogy(1 - p_t, 1 - p_t) - xlogy(1 - p_t, np.broadcast_to(1 - p, p_t.shape))
    return np.nan_to_num((weight * (on + off)).sum(0))


def explanations(features: FeatureMatrix, vr: list[np.ndarray], mi: list[np.ndarray],
                 dead: list[np.ndarray]) -> pd.DataFrame:
    """neuron_explanations.csv: per neuron its best feature and VR, the best feature of another
    family, its positional MI, and the family its best feature explains it as ("unexplained"
    below EXPLAINED_VR, "dead" for a neuron constant over the tokens)."""
    families = np.array(features.families)
    names = np.array(features.names)
    frames = []
    for layer, (v, m, constant) in enumerate(zip(vr, mi, dead)):
        best = v.argmax(0)
        other = np.where(families[:, None] != families[best][None, :], v, -1.0)
        second = other.argmax(0)
        cols = np.arange(v.shape[1])
        best_vr, second_vr = v[best, cols], np.maximum(other[second, cols], 0)
        frames.append(pd.DataFrame({
            "layer": layer, "neuron": cols, "best_feature": names[best], "best_vr": best_vr,
            "best_family": families[best], "second_feature": names[second], "second_vr": second_vr,
            "second_family": families[second], "positional_mi": m,
            "family": np.where(constant, DEAD, np.where(best_vr >= EXPLAINED_VR, families[best], "unexplained"))}))
    return pd.concat(frames, ignore_index=True)[EXPLANATION_COLUMNS]
