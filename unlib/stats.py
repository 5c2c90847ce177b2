"""Per-neuron statistics of a model (definitions: README, "The method"; as in Gurnee et al.
2024): weight norms and composition with the unembedding on the processed weights (LayerNorm
folded, writing weights and unembedding centred), and moments of the MLP pre-activation over
the dataset (sparsity: fraction of tokens where it is > 0), and the mean MLP post-activation
(what mean ablation substitutes, unlib.ablation)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from unlib.mlp_hooks import mlp_captures, processed_weights

STATS_COLUMNS = ["layer", "neuron", "w_in_norm", "w_out_norm", "l2_penalty", "input_bias", "in_out_sim",
                 "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt",
                 "act_mean", "act_var", "act_skew", "act_kurt", "sparsity", "post_mean"]


# Skew and Pearson kurtosis of a constant (zero-variance) series, which has none: those of a
# symmetric, normal-tailed one (skew 0, kurtosis 3 = excess kurtosis 0), never NaN.
CONSTANT_SKEW, CONSTANT_KURT = 0.0, 3.0


def _standardised(mu3: torch.Tensor, mu4: torch.Tensor, var: torch.Tensor,
                  constant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Skew mu3/var^1.5 and kurtosis mu4/var^2, CONSTANT_SKEW/KURT where `constant`."""
    safe = torch.where(constant, torch.ones_like(var), var.clamp_min(1e-150))  # 1e-150 ** 2 is a float64
    skew = torch.where(constant, torch.full_like(var, CONSTANT_SKEW), mu3 / safe ** 1.5)
    kurt = torch.where(constant, torch.full_like(var, CONSTANT_KURT), mu4 / safe ** 2)
    return skew, kurt


def moments(values: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """Mean, variance, skew and (Pearson, normal = 3) kurtosis along `dim`, float64; a
    constant series has variance 0, skew 0 and kurtosis 3."""
    v = values.double()
    mean = v.mean(dim, keepdim=True)
    c = v - mean
    constant = v.amax(dim) == v.amin(dim)
    var = torch.where(constant, torch.zeros((), dtype=v.dtype), (c ** 2).mean(dim))
    skew, kurt = _standardised((c ** 3).mean(dim), (c ** 4).mean(dim), var, constant)
    return torch.where(constant, v.amin(dim), mean.squeeze(dim)), var, skew, kurt


class MomentAccumulator:
    """Streaming mean, variance, skew, kurtosis and firing rate per neuron: float64 power
    sums around a shift taken from the first chunk (keeps the sums well conditioned). A
    neuron whose values are all equal (its running min equals its max) gets its value as
    mean, variance 0, skew 0 and kurtosis 3 exactly, not the power sums' rounding noise."""

    def __init__(self):
        self.shift = None
        self.n = 0
        self.sums = None
        self.positive = None
        self.low = self.high = None

    def update(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:  # a batch whose positions are all excluded
            return
        x = x.double()
        if self.shift is None:
            self.shift = x.mean(0)
            self.sums = [torch.zeros_like(self.shift) for _ in range(4)]
            self.positive = torch.zeros_like(self.shift)
        c = x - self.shift
        power = torch.ones_like(c)
        for k in range(4):
            power = power * c
            self.sums[k] += power.sum(0)
        self.positive += (x > 0).sum(0)
        low, high = x.amin(0), x.amax(0)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        self.n += x.shape[0]

    def result(self) -> dict[str, np.ndarray]:
        m1, m2, m3, m4 = (s / self.n for s in self.sums)
        constant = self.low == self.high
        var = torch.where(constant, torch.zeros_like(m2), m2 - m1 ** 2)
        mu3 = m3 - 3 * m1 * m2 + 2 * m1 ** 3
        mu4 = m4 - 4 * m1 * m3 + 6 * m1 ** 2 * m2 - 3 * m1 ** 4
        skew, kurt = _standardised(mu3, mu4, var, constant)
        return {"act_mean": torch.where(constant, self.low, self.shift + m1).numpy(), "act_var": var.numpy(),
                "act_skew": skew.numpy(), "act_kurt": kurt.numpy(),
                "sparsity": (self.positive / self.n).numpy()}


class NeuronStatsGenerator:
    """Computes `neuron_stats.csv` for one loaded model (a TransformerBridge with raw weights)."""

    def __init__(self, model):
        self.model = model

    def weight_stats(self) -> pd.DataFrame:
        """Norms, input bias, in/out cosine and vocabulary-cosine moments of each neuron, on the
        processed weights (the model itself is left raw)."""
        weights = processed_weights(self.model)
        w_in, w_out, b_in, w_u = weights["W_in"], weights["W_out"], weights["b_in"], weights["W_U"]
        w_u_unit = w_u / w_u.norm(dim=0, keepdim=True).clamp_min(1e-300)
        frames = []
        for layer in range(w_in.shape[0]):
            win = w_in[layer].T                             # (d_mlp, d_model)
            wout = w_out[layer]
            in_norm, out_norm = win.norm(dim=1), wout.norm(dim=1)
            cos_vocab = (wout / out_norm[:, None].clamp_min(1e-300)) @ w_u_unit  # (d_mlp, vocab)
            v_mean, v_var, v_skew, v_kurt = moments(cos_vocab, dim=1)
            frames.append(pd.DataFrame({
                "layer": layer, "neuron": np.arange(win.shape[0]),
                "w_in_norm": in_norm.numpy(), "w_out_norm": out_norm.numpy(),
                "l2_penalty": (in_norm ** 2 + out_norm ** 2).numpy(), "input_bias": b_in[layer].numpy(),
                "in_out_sim": ((win * wout).sum(1) / (in_norm * out_norm).clamp_min(1e-300)).numpy(),
                "vocab_mean": v_mean.numpy(), "vocab_var": v_var.numpy(),
                "vocab_skew": v_skew.numpy(), "vocab_kurt": v_kurt.numpy()}))
        return pd.concat(frames, ignore_index=True)

    def activation_stats(self, tokens: np.ndarray, keep: np.ndarray, batch_size: int = 32,
                         progress=None) -> pd.DataFrame:
        """Moments of the MLP pre-activation over the kept positions of the tokens, and the mean
        post-activation, taken in the same forward pass (mean ablation reads it from here)."""
        device = next(self.model.parameters()).device
        accs = [MomentAccumulator() for _ in range(self.model.cfg.n_layers)]
        post_sums = torch.zeros(self.model.cfg.n_layers, self.model.cfg.d_mlp, dtype=torch.float64)
        for seq in range(0, tokens.shape[0], batch_size):
            batch = torch.from_numpy(tokens[seq:seq + batch_size].astype(np.int64)).to(device)
            mask = torch.from_numpy(keep[seq:seq + batch_size])
            captured = mlp_captures(self.model, batch, mask, ("pre", "post"))
            for layer, (acc, pre, post) in enumerate(zip(accs, captured["pre"], captured["post"])):
                acc.update(pre.cpu())
                post_sums[layer] += post.double().sum(0).cpu()
            if progress is not None:
                progress(min(tokens.shape[0], seq + batch_size), tokens.shape[0])
        post_means = (post_sums / max(int(keep.sum()), 1)).numpy()
        frames = [pd.DataFrame({"layer": l, "neuron": np.arange(self.model.cfg.d_mlp), **acc.result(),
                                "post_mean": post_means[l]})
                  for l, acc in enumerate(accs)]
        return pd.concat(frames, ignore_index=True)

    def compute(self, tokens: np.ndarray, keep: np.ndarray, batch_size: int = 32, progress=None) -> pd.DataFrame:
        """Weight and activation statistics (over the kept positions of `tokens`) per neuron."""
        stats = self.weight_stats().merge(self.activation_stats(tokens, keep, batch_size, progress),
                                          on=["layer", "neuron"])
        return stats[STATS_COLUMNS]
