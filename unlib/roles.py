"""What neurons do, read from their weights (Gurnee et al. 2024, Section 5), on the processed
weights (LayerNorm folded, writing weights and unembedding centred):

- prediction and suppression neurons: the cosines of w_out with the unembedding's columns have
  a heavy tail (vocab_kurt > 10, the paper's cut), to the right (skew > 0: a few tokens are
  promoted) or to the left (suppressed);
- partition neurons: those cosines vary widely (vocab_var above PARTITION_VAR times what a
  random direction gives, which is the paper's 0.005 on GPT-2 medium's 1,024 dimensions) with a
  light tail: the neuron raises one part of the vocabulary and lowers the rest;
- entropy neurons: w_out lies in the effective null space of the unembedding (its bottom
  singular vectors, cut where the spectrum drops; Stolfo et al. 2024), so the neuron changes
  the final LayerNorm's scale, and with it the entropy, but hardly any logit; the paper's own
  candidates by norm are recorded beside;
- attention-deactivation neurons: w_out turns a later head's query towards the key of BOS,
  s(n, h) = (w_out/|w_out|)^T W_Q^h k_BOS^h / sqrt(d_head), far beyond what a random direction
  gives (the paper's Gaussian baseline), so the head attends to BOS and falls silent."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm

from unlib.mlp_hooks import processed_weights
from unlib.stats import moments

PREDICTION_KURT = 10.0
PARTITION_VAR = 5.0
# |P_null w_out| / |w_out| of an entropy neuron: at least this, and twice what a random direction
# has (sqrt(k / d)), which matters where the null space is a large part of the residual stream
ENTROPY_NULL_FRACTION = 0.5
NULL_DROP = 2.0  # the least ratio of neighbouring singular values that marks a null space
DEACTIVATION_ALPHA = 0.05  # family-wise, against the Gaussian baseline over all pairs
ROLES = ("entropy", "attention deactivation", "prediction", "suppression", "partition")
ROLE_COLUMNS = ["layer", "neuron", "vocab_kurt", "vocab_skew", "vocab_var", "null_fraction", "entropy_by_norm",
                "deactivation_layer", "deactivation_head", "deactivation_score", "deactivation_z", "role"]


def random_vocab_var(w_u: torch.Tensor) -> float:
    """The mean, over random unit directions u, of the variance across the vocabulary of
    cos(u, W_U[:, v]): (1 - |mean_v W_U[:, v]/|W_U[:, v]||^2) / d_model."""
    unit = w_u / w_u.norm(dim=0, keepdim=True).clamp_min(1e-300)
    return float((1 - unit.mean(1).norm() ** 2) / w_u.shape[0])


def vocab_moments(w_out: torch.Tensor, w_u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mean, variance, skew and kurtosis over the vocabulary of cos(w_out, W_U[:, v]) for each
    neuron of w_out (layers, d_mlp, d_model): the vocab_* statistics of unlib.stats."""
    unit_u = w_u / w_u.norm(dim=0, keepdim=True).clamp_min(1e-300)
    per_layer = [moments((w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)) @ unit_u, dim=1) for w in w_out]
    return tuple(torch.stack(m) for m in zip(*per_layer))  # a layer at a time: (d_mlp, vocab) float64 each


def effective_null_space(w_u: torch.Tensor, w_out: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """An orthonormal basis (d_model, k) of the unembedding's effective null space and how k was
    chosen: the left singular vectors below the largest ratio of neighbouring singular values in
    the bottom half of the spectrum, if that ratio reaches NULL_DROP (else k = 0); directions no
    token's unembedding reaches have singular value 0 (ratio infinite). With centred writing
    weights (every w_out orthogonal to the all-ones direction, which LayerNorm removes) that
    direction is left out first: no neuron can write there."""
    d = w_u.shape[0]
    space = torch.eye(d, dtype=w_u.dtype)
    if float(w_out.sum(-1).abs().max()) <= 1e-6 * float(w_out.abs().max()):
        ones = torch.ones(d, 1, dtype=w_u.dtype) / d ** 0.5
        space = torch.linalg.qr(torch.cat([ones, space], dim=1))[0][:, 1:d]
    # the left singular vectors and values from the (d x d) Gram matrix: an SVD would also make
    # the (vocab x vocab) right factor, 20 GB at GPT-2's vocabulary
    reduced = space.T @ w_u
    eigenvalues, vectors = torch.linalg.eigh(reduced @ reduced.T)
    s, u = eigenvalues.flip(0).clamp_min(0).sqrt(), vectors.flip(1)  # descending, zero where no token reaches
    half = len(s) // 2
    below = s[half + 1:].clamp_min(1e-12 * float(s[0]))
    ratios = s[half:-1] / below
    if len(ratios) == 0:
        return space[:, :0], {"k": 0, "drop_ratio": None}
    at = int(ratios.argmax())
    ratio = float(ratios[at])
    k = len(s) - (half + at + 1) if ratio >= NULL_DROP else 0
    return space @ u[:, len(s) - k:], {"k": k, "drop_ratio": ratio}


def null_fraction(w_out: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """|P w| / |w| of each row of w_out (neurons, d_model) for the projection P onto `basis`."""
    return (w_out @ basis).norm(dim=1) / w_out.norm(dim=1).clamp_min(1e-300)


@torch.no_grad()
def bos_keys(model, bos_id: int) -> torch.Tensor:
    """The key of BOS at position 0 in every layer, per query head: (layers, heads, d_head)
    (a grouped-query model's key heads repeated for the query heads that share them)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    keys: list[torch.Tensor | None] = [None] * n_layers

    def keeper(layer: int):
        def keep(act, hook):
            keys[layer] = act[0, 0].detach().double().cpu()
            return act
        return keep

    device = next(model.parameters()).device
    model.run_with_hooks(torch.tensor([[bos_id]], device=device),
                         fwd_hooks=[(f"blocks.{l}.attn.hook_k", keeper(l)) for l in range(n_layers)], return_type=None)
    stacked = torch.stack(keys)
    return stacked.repeat_interleave(n_heads // stacked.shape[1], dim=1)


def deactivation_scores(w_out: torch.Tensor, w_q: torch.Tensor, k_bos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s(n, l, h) for every neuron (layers, d_mlp) and head (layers, heads), and the Gaussian
    baseline's standard deviation per head: that of the score of a random unit direction,
    |W_Q^h k_BOS^h| / sqrt(d_head d_model). Pairs whose head is not after the neuron are NaN."""
    d_model, d_head = w_q.shape[2], w_q.shape[3]
    direction = torch.einsum("lhmd,lhd->lhm", w_q, k_bos) / d_head ** 0.5     # (layers, heads, d_model)
    unit = w_out / w_out.norm(dim=2, keepdim=True).clamp_min(1e-300)         # (layers, d_mlp, d_model)
    scores = torch.einsum("nim,lhm->nilh", unit, direction)
    n_layers = w_out.shape[0]
    later = torch.arange(n_layers)[None, :] > torch.arange(n_layers)[:, None]  # (neuron layer, head layer)
    scores = torch.where(later[:, None, :, None], scores, torch.full_like(scores, float("nan")))
    return scores, direction.norm(dim=2) / d_model ** 0.5


def role_of(evidence: pd.DataFrame, partition_var: float, deactivation_z: float,
            null_fraction_cut: float = ENTROPY_NULL_FRACTION) -> np.ndarray:
    """Each neuron's role from its evidence (columns vocab_kurt, vocab_skew, vocab_var,
    null_fraction, deactivation_z): the first of ROLES it meets, '' for none."""
    heavy = evidence["vocab_kurt"] > PREDICTION_KURT
    meets = {"entropy": evidence["null_fraction"] >= null_fraction_cut,
             "attention deactivation": evidence["deactivation_z"] >= deactivation_z,
             "prediction": heavy & (evidence["vocab_skew"] > 0), "suppression": heavy & (evidence["vocab_skew"] < 0),
             "partition": ~heavy & (evidence["vocab_var"] > partition_var)}
    role = np.full(len(evidence), "", dtype=object)
    for name in reversed(ROLES):
        role[meets[name].to_numpy()] = name
    return role


class WeightRoles:
    """The roles of one model's neurons from its weights and neuron_stats.csv."""

    def __init__(self, model, stats: pd.DataFrame, bos_id: int, vocabulary: np.ndarray | None = None):
        weights = processed_weights(model)
        self.w_out = weights["W_out"]
        # the unembedding of the tokens the model was trained on: a never-seen token's column
        # holds nothing the neuron could have learnt to promote (it would top both ends)
        self.w_u = weights["W_U"] if vocabulary is None else weights["W_U"][:, torch.as_tensor(vocabulary)]
        self.n_layers, self.d_mlp = self.w_out.shape[0], self.w_out.shape[1]
        self.stats = stats.sort_values(["layer", "neuron"]).reset_index(drop=True)
        _, self.vocab_var, self.vocab_skew, self.vocab_kurt = (m.reshape(-1).numpy()
                                                               for m in vocab_moments(self.w_out, self.w_u))
        self.basis, self.null_space = effective_null_space(self.w_u, self.w_out)
        self.scores, self.baseline_sd = deactivation_scores(self.w_out, weights["W_Q"], bos_keys(model, bos_id))
        self.n_pairs = int((~torch.isnan(self.scores)).sum())
        # Bonferroni over every (neuron, later head) pair against the Gaussian baseline
        self.deactivation_cut = float(norm.isf(DEACTIVATION_ALPHA / max(self.n_pairs, 1)))
        self.partition_var = PARTITION_VAR * random_vocab_var(self.w_u)
        self.null_fraction_cut = max(ENTROPY_NULL_FRACTION, 2 * (self.null_space["k"] / self.basis.shape[0]) ** 0.5)

    def entropy_by_norm(self) -> np.ndarray:
        """The paper's entropy-neuron query, scaled to any model: in the last sixth of the
        layers (at least the last), l2_penalty in the model's top 1 %, vocab_kurt and act_kurt
        at most 10, vocab_var at most a random direction's."""
        s = self.stats
        last = s["layer"] >= self.n_layers - max(1, round(self.n_layers / 6))
        heavy = s["l2_penalty"] >= s["l2_penalty"].quantile(0.99)
        return (last & heavy & (self.vocab_kurt <= PREDICTION_KURT) & (s["act_kurt"] <= PREDICTION_KURT)
                & (self.vocab_var <= random_vocab_var(self.w_u))).to_numpy()

    def table(self) -> pd.DataFrame:
        """neuron_roles.csv: per neuron the evidence for each role and its role ('' for none),
        the first of ROLES it meets."""
        s = self.stats
        z = self.scores / self.baseline_sd[None, None]
        flat = torch.nan_to_num(z, nan=-np.inf).reshape(self.n_layers, self.d_mlp, -1)
        best = flat.argmax(2)
        best_z = flat.gather(2, best[..., None])[..., 0].reshape(-1)
        n_heads = self.scores.shape[3]
        null = null_fraction(self.w_out.reshape(-1, self.w_out.shape[2]), self.basis)
        has_head = torch.isfinite(best_z)
        out = pd.DataFrame({
            "layer": s["layer"], "neuron": s["neuron"], "vocab_kurt": self.vocab_kurt,
            "vocab_skew": self.vocab_skew, "vocab_var": self.vocab_var, "null_fraction": null.numpy(),
            "entropy_by_norm": self.entropy_by_norm(),
            "deactivation_layer": np.where(has_head, (best // n_heads).reshape(-1).numpy(), -1),
            "deactivation_head": np.where(has_head, (best % n_heads).reshape(-1).numpy(), -1),
            "deactivation_score": np.where(has_head, (best_z * self.baseline_sd.reshape(-1)[best.reshape(-1)]).numpy(),
                                           np.nan),
            "deactivation_z": np.where(has_head, best_z.numpy(), np.nan)})
        out["role"] = role_of(out, self.partition_var, self.deactivation_cut, self.null_fraction_cut)
        return out[ROLE_COLUMNS]

    def record(self) -> dict:
        """What the roles were decided with: the null space's size and drop, the cuts."""
        return {"null_space_k": self.null_space["k"], "null_space_drop_ratio": self.null_space["drop_ratio"],
                "random_vocab_var": random_vocab_var(self.w_u), "prediction_kurt": PREDICTION_KURT,
                "partition_var": self.partition_var, "entropy_null_fraction": self.null_fraction_cut,
                "deactivation_pairs": self.n_pairs, "deactivation_z": self.deactivation_cut}
