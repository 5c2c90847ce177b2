"""A straightforward implementation of the method as the paper's code does it, to measure
the engine against: float64 streaming sums for every (reference layer, other layer) pair
and every direction, the rotation applied to the activations in every batch, and one
pass over the tokens per rotation sample."""
from __future__ import annotations

import torch


def reference_max_correlations(chunks, layer_sizes: list[list[int]], rotations: list[dict]) -> dict:
    """{(reference, other): (max corr per reference neuron, [max rotated corr per sample])}
    for every ordered pair of models. `chunks()` yields per model a (tokens, neurons) tensor;
    `rotations[r][(model, layer)]` is that layer's rotation for sample r."""
    n_models = len(layer_sizes)
    out = {}
    for ref in range(n_models):
        for other in range(n_models):
            if other == ref:
                continue
            plain = _one_pass(chunks, ref, other, layer_sizes, None)
            rotated = [_one_pass(chunks, ref, other, layer_sizes, r) for r in rotations]
            out[(ref, other)] = (plain, rotated)
    return out


def _one_pass(chunks, ref: int, other: int, layer_sizes, rotation: dict | None) -> torch.Tensor:
    sums = {}
    n = 0
    for chunk in chunks():
        x_layers = [a.double() for a in chunk[ref].split(layer_sizes[ref], dim=1)]
        y_layers = [a.double() for a in chunk[other].split(layer_sizes[other], dim=1)]
        if rotation is not None:
            y_layers = [y @ rotation[(other, l)].double() for l, y in enumerate(y_layers)]
        n += x_layers[0].shape[0]
        for i, x in enumerate(x_layers):
            for j, y in enumerate(y_layers):
                s = sums.setdefault((i, j), [0.0] * 5)
                s[0] = s[0] + x.sum(0)
                s[1] = s[1] + y.sum(0)
                s[2] = s[2] + (x * x).sum(0)
                s[3] = s[3] + (y * y).sum(0)
                s[4] = s[4] + x.T @ y
    best = []
    for i in range(len(layer_sizes[ref])):
        row = []
        for j in range(len(layer_sizes[other])):
            sx, sy, sxx, syy, sxy = sums[(i, j)]
            cov = sxy / n - torch.outer(sx / n, sy / n)
            var_x = sxx / n - (sx / n) ** 2
            var_y = syy / n - (sy / n) ** 2
            row.append(cov / torch.sqrt(torch.outer(var_x, var_y)))
        best.append(torch.cat(row, dim=1).max(dim=1).values)
    return torch.cat(best)
