"""The paper's published algorithm, written plainly, to measure the engine against.

Gurnee et al. (2024) compute correlations with `StreamingPearsonComputer`
(correlations_fast.py in wesg52/universal-neurons). For one model pair at a time it streams
token batches and keeps, in float64, each model's per-neuron sums and sums of squares and
the full cross-model sum of products, to which every batch adds one float32 product per
(layer of model 1, layer of model 2). At the end the correlation is
(S_xy - S_x S_y / n) / sqrt((S_xx - S_x^2 / n)(S_yy - S_y^2 / n)). The rotation baseline is
a separate run over the tokens in which model 2's activations are rotated within each
layer, in float32, in every batch: one more pass per rotation sample.

Here each pass reads activations already in memory (the paper reruns both models every
pass), in batches of the paper's default size (32 sequences of 512 tokens), and the
correlations are kept in float64 (the paper stores them as float16)."""
from __future__ import annotations

import torch

PAPER_BATCH_TOKENS = 32 * 512


class StreamingPearson:
    """Pearson correlations of every neuron of model x with every neuron of model y, from
    float64 running sums fed one token batch at a time."""

    def __init__(self, sizes_x: list[int], sizes_y: list[int]):
        self.sizes_x, self.sizes_y = sizes_x, sizes_y
        dx, dy = sum(sizes_x), sum(sizes_y)
        self.sum_x = torch.zeros(dx, dtype=torch.float64)
        self.sum_xx = torch.zeros(dx, dtype=torch.float64)
        self.sum_y = torch.zeros(dy, dtype=torch.float64)
        self.sum_yy = torch.zeros(dy, dtype=torch.float64)
        self.sum_xy = torch.zeros(dx, dy, dtype=torch.float64)
        self.n = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch: x (tokens, neurons of x, layer after layer), y the same for y; float32."""
        row = 0
        for x_layer in x.split(self.sizes_x, dim=1):
            col = 0
            for y_layer in y.split(self.sizes_y, dim=1):
                product = x_layer.T @ y_layer  # float32, one layer pair
                self.sum_xy[row:row + x_layer.shape[1], col:col + y_layer.shape[1]] += product
                col += y_layer.shape[1]
            row += x_layer.shape[1]
        x64, y64 = x.double(), y.double()
        self.sum_x += x64.sum(0)
        self.sum_xx += (x64 * x64).sum(0)
        self.sum_y += y64.sum(0)
        self.sum_yy += (y64 * y64).sum(0)
        self.n += x.shape[0]

    def correlation(self) -> torch.Tensor:
        """(neurons of x, neurons of y) float64 correlations."""
        numerator = self.sum_xy - torch.outer(self.sum_x, self.sum_y) / self.n
        norm_x = (self.sum_xx - self.sum_x ** 2 / self.n).sqrt()
        norm_y = (self.sum_yy - self.sum_y ** 2 / self.n).sqrt()
        return numerator / torch.outer(norm_x, norm_y)


def rotate(y: torch.Tensor, sizes: list[int], rotation: dict[int, torch.Tensor]) -> torch.Tensor:
    """y's activations rotated within each layer (float32): layer l becomes y_l @ Q_l."""
    return torch.cat([y_layer @ rotation[l] for l, y_layer in enumerate(y.split(sizes, dim=1))], dim=1)


def pair_pass(batches, x: int, y: int, layer_sizes: list[list[int]],
              rotation: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """One pass over the tokens for models x and y (y rotated if `rotation`, {layer: Q}):
    the correlation matrix of x's neurons with y's."""
    computer = StreamingPearson(layer_sizes[x], layer_sizes[y])
    for batch in batches():
        y_acts = batch[y] if rotation is None else rotate(batch[y], layer_sizes[y], rotation)
        computer.update(batch[x], y_acts)
    return computer.correlation()


def paper_max_correlations(batches, layer_sizes: list[list[int]], rotations: list[dict], reference: int = 0) -> dict:
    """{other model: (max corr of each reference neuron, [max corr against the rotated other
    model, one per rotation sample])}, the way the paper computes them: for each other
    model one plain pass and one pass per rotation sample. `batches()` yields per model a
    (tokens, neurons) float32 tensor; `rotations[r][(model, layer)]` is that layer's
    rotation for sample r."""
    out = {}
    for other in range(len(layer_sizes)):
        if other == reference:
            continue
        plain = pair_pass(batches, reference, other, layer_sizes).max(dim=1).values
        rotated = [pair_pass(batches, reference, other, layer_sizes,
                             {l: rotation[(other, l)] for l in range(len(layer_sizes[other]))}).max(dim=1).values
                   for rotation in rotations]
        out[other] = (plain, rotated)
    return out
