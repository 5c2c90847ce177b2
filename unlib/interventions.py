"""The paper's causal checks of neuron roles (Gurnee et al. 2024, Section 5;
`entropy_intervention.py`, `attention_deactivation.py`): fix a neuron's post-activation to each
value of a sweep at every position, on held-out tokens, and record the next-token loss, the
entropy of the next-token distribution, the final LayerNorm's scale and each head's attention to
BOS; the candidates (entropy and attention-deactivation neurons) against random neurons of the
same layer, swept the same way."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch

from unlib.ablation import LOGITS_BYTES
from unlib.mlp_hooks import hook_post

# The paper's sweep (slurm/entropy_intervention.sh): about GELU's minimum, 0, then 1 to 6.
SWEEP_VALUES = (-0.17, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
CANDIDATES = 3  # per kind: the top entropy neurons (by null fraction) and deactivation pairs (by z)
CONTROLS = 19  # random neurons per layer holding a candidate: a permutation p can reach 0.05
# held-out positions the sweep reads: every condition is measured on the same tokens (a paired
# design), so a few sequences suffice, and (candidates + controls) x values passes are affordable
SWEEP_TOKENS = 1024
SWEEP_COLUMNS = ["layer", "neuron", "value", "loss", "entropy", "ln_scale"]
SUMMARY_COLUMNS = ["kind", "layer", "neuron", "role", "head_layer", "head", "metric", "slope", "control_mean",
                   "control_min", "control_max", "n_controls", "p"]


def head_column(layer: int, head: int) -> str:
    return f"bos_attention_{layer}.{head}"


@torch.no_grad()
def activation_sweep(model, tokens: np.ndarray, keep: np.ndarray, neurons: list[tuple[int, int]],
                     heads: list[tuple[int, int]], values: tuple[float, ...] = SWEEP_VALUES, batch_size: int = 32,
                     queries_only: bool = False, progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """sweep.csv: for each neuron (layer, neuron) and value, its post-activation fixed to the value
    at every position of the BOS-led sequences `tokens`: the mean loss of the kept tokens (each
    predicted from the tokens before it), and over the kept positions the mean next-token
    entropy (nats), final LayerNorm scale and each of `heads`' attention to BOS (columns
    bos_attention_<layer>.<head>); first the unchanged model (layer and neuron -1, value NaN).
    With `queries_only`, the keys and values of the heads' layers are those of the unchanged
    model, so a neuron acts on those heads through their queries alone (the paper's path
    ablation in attention_deactivation.py). Conditions run stacked in the batch dimension, as
    many per pass as LOGITS_BYTES allows."""
    device = next(model.parameters()).device
    conditions = [(-1, -1, float("nan"))] + [(l, n, float(v)) for l, n in neurons for v in values]
    sums = torch.zeros(len(conditions), 3 + len(heads), dtype=torch.float64)
    n_loss = n_kept = 0
    total = int(keep.sum())
    for seq in range(0, tokens.shape[0], batch_size):
        batch = torch.from_numpy(tokens[seq:seq + batch_size].astype(np.int64)).to(device)
        kept = torch.from_numpy(keep[seq:seq + batch_size]).to(device)
        scored = kept[:, 1:]
        group = max(1, LOGITS_BYTES.get(device.type, LOGITS_BYTES["cpu"]) // (4 * batch.numel() * model.cfg.d_vocab))
        original = _keys_and_values(model, batch, {l for l, _ in heads}) if queries_only else {}
        for start in range(0, len(conditions), group):
            chosen = conditions[start:start + group]
            sums[start:start + len(chosen)] += _fixed_pass(model, batch, kept, scored, chosen, heads, original)
        n_loss += int(scored.sum())
        n_kept += int(kept.sum())
        if progress is not None:
            progress(n_kept, total)
    means = sums.numpy()
    means[:, 0] /= max(n_loss, 1)
    means[:, 1:] /= max(n_kept, 1)
    table = pd.DataFrame(means, columns=["loss", "entropy", "ln_scale"] + [head_column(*h) for h in heads])
    table.insert(0, "value", [c[2] for c in conditions])
    table.insert(0, "neuron", [c[1] for c in conditions])
    table.insert(0, "layer", [c[0] for c in conditions])
    return table


def _keys_and_values(model, batch: torch.Tensor, layers: set[int]) -> dict[str, torch.Tensor]:
    """The unchanged model's attention keys and values of `layers` on the batch, by hook name
    (kept by closure: a bridge's hook may report an aliased name)."""
    captured = {}

    def keeper(name: str):
        def keep(act, hook):
            captured[name] = act
            return act
        return keep

    names = [f"blocks.{l}.attn.hook_{kind}" for l in sorted(layers) for kind in ("k", "v")]
    model.run_with_hooks(batch, fwd_hooks=[(name, keeper(name)) for name in names], return_type=None)
    return captured


def _fixed_pass(model, batch: torch.Tensor, kept: torch.Tensor, scored: torch.Tensor,
                chosen: list[tuple[int, int, float]], heads: list[tuple[int, int]],
                original: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sums over the batch, per condition, of loss (scored targets), entropy, LN scale and BOS
    attentions (kept positions), the batch repeated once per condition; the keys and values in
    `original` (by hook name) replace the condition's own."""
    n = len(chosen)
    captured: dict[str, torch.Tensor] = {}

    def fix(layer: int):
        index = [c for c, (l, _, _) in enumerate(chosen) if l == layer]
        rows = torch.tensor(index, device=batch.device)
        neurons = torch.tensor([chosen[c][1] for c in index], device=batch.device)
        fixed = torch.tensor([chosen[c][2] for c in index], device=batch.device)

        def replace(act, hook):
            shaped = act.reshape(n, -1, *act.shape[1:]).clone()
            shaped[rows, :, :, neurons] = fixed[:, None, None].to(act.dtype)
            return shaped.reshape(act.shape)
        return replace

    def keep_as(name: str):
        def keep(act, hook):
            captured[name] = act
            return act
        return keep

    layers = sorted({l for l, _, _ in chosen if l >= 0})
    hooks = [(hook_post(l), fix(l)) for l in layers] + [("ln_final.hook_scale", keep_as("scale"))]
    hooks += [(f"blocks.{l}.attn.hook_pattern", keep_as(f"pattern {l}")) for l in sorted({l for l, _ in heads})]
    hooks += [(name, lambda act, hook, value=value: value.repeat(n, *[1] * (value.dim() - 1)))
              for name, value in original.items()]
    logits = model.run_with_hooks(batch.repeat(n, 1), fwd_hooks=hooks, return_type="logits")
    logits = logits.reshape(n, *batch.shape, -1).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = batch[:, 1:]
    loss = -log_probs[:, :, :-1].gather(-1, targets[None, ..., None].expand(n, -1, -1, 1))[..., 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    scale = captured["scale"].reshape(n, *batch.shape, -1)[..., 0].float()
    out = [loss[:, scored].double().sum(1), entropy[:, kept].double().sum(1), scale[:, kept].double().sum(1)]
    for l, h in heads:
        pattern = captured[f"pattern {l}"].reshape(n, batch.shape[0], -1, batch.shape[1], batch.shape[1])
        out.append(pattern[:, :, h, :, 0][:, kept].double().sum(1))
    return torch.stack(out, 1).cpu()


def first_tokens(tokens: np.ndarray, keep: np.ndarray, n: int = SWEEP_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """The first sequences of a token file holding at least `n` kept positions (all if fewer)."""
    rows = int(np.searchsorted(np.cumsum(keep.sum(1)), n)) + 1
    return tokens[:rows], keep[:rows]


def sweep_slopes(sweep: pd.DataFrame, column: str) -> pd.Series:
    """Per neuron (layer, neuron) the least-squares slope of `column` against the fixed value."""
    fixed = sweep[sweep["layer"] >= 0]
    return pd.Series({key: np.polyfit(g["value"], g[column], 1)[0] for key, g in fixed.groupby(["layer", "neuron"])})


def control_neurons(candidates: list[tuple[int, int]], d_mlp: int, seed: int) -> list[tuple[int, int]]:
    """CONTROLS random neurons of each layer holding a candidate, none of them a candidate, from
    the generator seeded (seed, layer)."""
    out = []
    for layer in sorted({l for l, _ in candidates}):
        pool = [n for n in range(d_mlp) if (layer, n) not in candidates]
        rng = np.random.default_rng([seed, layer])
        out += [(layer, int(n)) for n in sorted(rng.choice(pool, min(CONTROLS, len(pool)), replace=False))]
    return out


def intervention_candidates(roles: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The neurons the causal checks sweep: the CANDIDATES highest null fractions (entropy, in
    whatever layers they are; where the unembedding has no null space, the paper's candidates
    by norm) and deactivation z-scores (with their head), whether or not they pass the role's
    cut (the check says whether the best of them act)."""
    by_null = roles[roles["null_fraction"] > 0].sort_values(["null_fraction", "layer", "neuron"], ascending=False)
    entropy = by_null if len(by_null) else roles[roles["entropy_by_norm"]]
    paired = roles[roles["deactivation_head"] >= 0]
    deactivation = paired.sort_values(["deactivation_z", "layer", "neuron"], ascending=False)
    return {"entropy": entropy.head(CANDIDATES), "deactivation": deactivation.head(CANDIDATES)}


def intervention_summary(kind: str, sweep: pd.DataFrame, candidates: pd.DataFrame,
                         controls: list[tuple[int, int]]) -> pd.DataFrame:
    """Per candidate of `kind`, the slope of its metric (entropy for entropy candidates, its
    head's BOS attention for deactivation ones) against the fixed value, beside the same slope
    of the random neurons of its layer, and the permutation p-value (1 + k) / (1 + n), k of the
    n controls with a slope at least as large in absolute value."""
    rows = []
    for r in candidates.itertuples():
        head = (int(r.deactivation_layer), int(r.deactivation_head)) if kind == "deactivation" else (-1, -1)
        column = head_column(*head) if kind == "deactivation" else "entropy"
        slopes = sweep_slopes(sweep, column)
        own = float(slopes.loc[(r.layer, r.neuron)])
        others = np.array([slopes.loc[c] for c in controls if c[0] == r.layer])
        spread = (others.mean(), others.min(), others.max()) if len(others) else (np.nan,) * 3
        rows.append({"kind": kind, "layer": r.layer, "neuron": r.neuron, "head_layer": head[0], "head": head[1],
                     "metric": column, "slope": own, "control_mean": spread[0], "control_min": spread[1],
                     "control_max": spread[2], "n_controls": len(others), "role": r.role,
                     "p": (1 + int((np.abs(others) >= abs(own)).sum())) / (1 + len(others))})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def causal_checks(model, tokens: np.ndarray, keep: np.ndarray, roles: pd.DataFrame, seed: int,
                  batch_size: int = 32, progress: Callable[[int, int], None] | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """interventions.csv and interventions_summary.csv of a model (a TransformerBridge) from its
    neuron_roles.csv, on the first SWEEP_TOKENS kept positions of held-out tokens: the entropy
    candidates and the random neurons of their layers swept as the paper's entropy intervention
    (loss, entropy, LayerNorm scale), the deactivation candidates and theirs through the queries
    of the candidates' heads only (BOS attention); controls drawn with `seed`."""
    tokens, keep = first_tokens(tokens, keep)
    total = 2 * int(keep.sum())
    sweeps, summaries = [], []
    for step, (kind, candidates) in enumerate(intervention_candidates(roles).items()):
        if candidates.empty:  # no null space and no candidate by norm; one layer, so no later head
            continue
        chosen = [(int(r.layer), int(r.neuron)) for r in candidates.itertuples()]
        controls = control_neurons(chosen, model.cfg.d_mlp, seed)
        heads = sorted({(int(r.deactivation_layer), int(r.deactivation_head)) for r in candidates.itertuples()}) \
            if kind == "deactivation" else []
        offset = step * total // 2
        done = (lambda n, _: progress(offset + n, total)) if progress is not None else None
        sweep = activation_sweep(model, tokens, keep, chosen + controls, heads, batch_size=batch_size,
                                 queries_only=kind == "deactivation", progress=done)
        sweeps.append(sweep.assign(sweep=kind))
        summaries.append(intervention_summary(kind, sweep, candidates, controls))
    if not sweeps:
        return pd.DataFrame(columns=["sweep"] + SWEEP_COLUMNS), pd.DataFrame(columns=SUMMARY_COLUMNS)
    sweep = pd.concat(sweeps, ignore_index=True)
    return sweep[["sweep"] + [c for c in sweep.columns if c != "sweep"]], pd.concat(summaries, ignore_index=True)
