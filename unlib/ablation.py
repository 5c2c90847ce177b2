"""Functional impact of a set of MLP neurons (Nandan et al. 2025): ablate the set (each neuron's
post-activation replaced by its mean over a dataset, or by 0) and measure, on held-out tokens,
the change in next-token loss, the KL divergence of the ablated from the original next-token
distribution and how often the top prediction survives; against random sets holding as many
neurons in each layer (matched on activation frequency too, by default), drawn from a recorded
seed, with permutation p-values."""
from __future__ import annotations

from typing import Callable, Hashable, Iterable

import numpy as np
import pandas as pd
import torch

from unlib.mlp_hooks import default_keep, hook_post, mlp_activations

ABLATIONS = ("mean", "zero")
ABLATION_CONTROLS = ("matched", "layer")  # the random sets: matched on activation frequency too, or on layer only
# Logits one forward pass may hold, by device type: conditions are stacked into a pass up to this
# size (at least one). A GPU is filled by large passes; on a CPU a pass of one condition keeps the
# activations in cache (3x faster than all conditions at once on the toy zoo, measured).
LOGITS_BYTES = {"cuda": 2**28, "cpu": 2**20}
TABLE_COLUMNS = ["scope", "condition", "n_neurons", "loss", "delta_loss", "kl", "top1_agreement"]
METRICS = ("delta_loss", "kl")
FEW_DOCUMENTS = 20  # held-out tokens from fewer documents than this get a warning
SUMMARY_COLUMNS = ["scope", "n_neurons", "n_random"] + [
    f"{prefix}{metric}{suffix}" for metric in METRICS
    for prefix, suffix in [("universal_", ""), ("random_", "_mean"), ("random_", "_std"), ("random_", "_q05"),
                           ("random_", "_q95"), ("", "_z"), ("", "_p")]]

Neurons = Iterable[tuple[int, int]]


def neuron_list(neurons: Neurons | pd.DataFrame) -> list[tuple[int, int]]:
    """(layer, neuron) pairs, sorted, from pairs or a table with `layer` and `neuron` columns."""
    if isinstance(neurons, pd.DataFrame):
        neurons = zip(neurons["layer"], neurons["neuron"])
    return sorted({(int(layer), int(neuron)) for layer, neuron in neurons})


def layer_counts(neurons: Neurons) -> dict[int, int]:
    """How many of the neurons are in each layer (layers holding none are left out)."""
    counts: dict[int, int] = {}
    for layer, _ in neurons:
        counts[layer] = counts.get(layer, 0) + 1
    return dict(sorted(counts.items()))


def frequency_deciles(frequency: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Each neuron's activation-frequency decile (0-9) among its layer's live neurons, -1 for a
    dead one; `frequency` and `live` are (layers, neurons)."""
    deciles = np.full(frequency.shape, -1)
    for layer in range(frequency.shape[0]):
        values = frequency[layer, live[layer]]
        if len(values):
            ranks = values.argsort(kind="stable").argsort(kind="stable")
            deciles[layer, live[layer]] = ranks * 10 // len(values)
    return deciles


def random_sets(neurons: Neurons, d_mlp: int, n_sets: int, seed: int,
                deciles: np.ndarray | None = None) -> list[list[tuple[int, int]]]:
    """`n_sets` random neuron sets with as many neurons in each layer as `neurons`, drawn without
    replacement from the layer's other neurons. With `deciles` (frequency_deciles: the matched
    control), each of `neurons` is paired with a live neuron of its layer from its own
    activation-frequency decile (the nearest decile with one left, where its own has none);
    dead neurons are drawn only when no live one is left. Without them (the layer control), uniformly from the layer
    (from the whole layer where fewer than needed are left). Set k comes from the generator
    seeded (seed, k), so each is reproducible alone and more sets leave the first ones as they were."""
    chosen = neuron_list(neurons)
    counts = layer_counts(chosen)
    out = []
    for k in range(n_sets):
        rng = np.random.default_rng([seed, k])
        drawn = []
        for layer, count in counts.items():
            taken = {n for l, n in chosen if l == layer}
            if deciles is None:
                pool = np.array([n for n in range(d_mlp) if n not in taken])
                pool = pool if len(pool) >= count else np.arange(d_mlp)
                drawn += [(layer, int(n)) for n in sorted(rng.choice(pool, count, replace=False))]
                continue
            left = {n for n in np.flatnonzero(deciles[layer] >= 0) if n not in taken}
            picked = []
            for n in sorted(taken):
                if left:
                    gap = min(abs(deciles[layer, m] - deciles[layer, n]) for m in left)
                    pool = sorted(m for m in left if abs(deciles[layer, m] - deciles[layer, n]) == gap)
                else:  # no live neuron left to pair with: any other of the layer, as the layer control draws
                    pool = [m for m in range(d_mlp) if m not in taken and m not in picked] or \
                        [m for m in range(d_mlp) if m not in picked]
                pick = int(rng.choice(pool))
                left.discard(pick)
                picked.append(pick)
            drawn += [(layer, n) for n in sorted(picked)]
        out.append(drawn)
    return out


def ablation_sets(universal: Neurons, d_mlp: int, n_random: int, seed: int,
                  deciles: np.ndarray | None = None) -> dict[tuple[str, str], list]:
    """The pipeline's conditions, {(scope, condition): neurons}: scope `all` ablates the universal
    set (condition `universal`) or a random set (`random-<k>`, random_sets: matched on
    activation frequency with `deciles`) in every layer, scope `layer <l>` only their neurons in
    layer l, for each layer holding universal neurons; and each universal neuron alone (scope
    `neuron <l>:<n>`, condition `universal`)."""
    chosen = neuron_list(universal)
    if not chosen:  # nothing to ablate (the pipeline then runs no pass)
        return {}
    randoms = random_sets(chosen, d_mlp, n_random, seed, deciles)
    sets = {}
    for scope, layers in [("all", None), *((f"layer {l}", {l}) for l in layer_counts(chosen))]:
        within = lambda neurons: [(l, n) for l, n in neurons if layers is None or l in layers]  # noqa: E731
        sets[(scope, "universal")] = within(chosen)
        for k, drawn in enumerate(randoms):
            sets[(scope, f"random-{k}")] = within(drawn)
    for neuron in chosen:
        sets[(f"neuron {neuron[0]}:{neuron[1]}", "universal")] = [neuron]
    return sets


@torch.no_grad()
def mean_activations(model, tokens: np.ndarray, keep: np.ndarray | None = None, batch_size: int = 32) -> torch.Tensor:
    """Each neuron's mean post-activation (hook_post) over the kept positions, (n_layers, d_mlp)
    float64: the values of mean ablation, for a notebook (the pipeline takes them from its
    statistics pass, neuron_stats.csv's `post_mean`)."""
    device = next(model.parameters()).device
    sums = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.float64)
    count = 0
    for seq in range(0, tokens.shape[0], batch_size):
        batch = torch.from_numpy(tokens[seq:seq + batch_size].astype(np.int64)).to(device)
        mask = default_keep(batch).cpu() if keep is None else torch.from_numpy(keep[seq:seq + batch_size])
        for layer, acts in enumerate(mlp_activations(model, batch, mask)):
            sums[layer] += acts.double().sum(0).cpu()
        count += int(mask.sum())
    return sums / max(count, 1)


def _masks(sets: list[list[tuple[int, int]]], n_layers: int, d_mlp: int) -> torch.Tensor:
    """(n_layers, conditions, d_mlp) boolean: which neurons each condition ablates."""
    masks = torch.zeros(n_layers, len(sets), d_mlp, dtype=torch.bool)
    for c, neurons in enumerate(sets):
        for layer, neuron in neurons:
            masks[layer, c, neuron] = True
    return masks


@torch.no_grad()
def ablation_metrics(model, tokens: np.ndarray, keep: np.ndarray | None, sets: dict[Hashable, Neurons],
                     values: torch.Tensor | None = None, batch_size: int = 32,
                     progress: Callable[[int, int], None] | None = None) -> tuple[dict, dict[Hashable, dict]]:
    """Ablate each neuron set of `sets` in `model` (a TransformerBridge) and measure it on the
    token sequences `tokens` (BOS-led, (sequences, ctx)): every kept token (`keep`, default all
    but position 0) is predicted from the tokens before it in its sequence.

    An ablated neuron's post-activation becomes `values[layer, neuron]` ((n_layers, d_mlp), its
    dataset mean for mean ablation) at every position, or 0 when `values` is None. Returns
    (the original model's {"loss", "n_tokens"}, {key: {"n_neurons", "loss", "delta_loss", "kl",
    "top1_agreement"}}): mean next-token loss (nats), its change from the original, the mean per
    token KL(original || ablated) (nats) and the fraction of tokens whose most likely next token
    is unchanged. Each batch of tokens is read once for every set: the sets (and the original
    model) run stacked in the batch dimension, as many per forward pass as LOGITS_BYTES allows."""
    n_layers, d_mlp, vocab = model.cfg.n_layers, model.cfg.d_mlp, model.cfg.d_vocab
    device = next(model.parameters()).device
    lists = {key: neuron_list(neurons) for key, neurons in sets.items()}
    distinct = sorted({tuple(neurons) for neurons in lists.values()})  # a set named twice runs once
    conditions = [[]] + [list(neurons) for neurons in distinct if neurons]  # condition 0: nothing ablated
    masks = _masks(conditions, n_layers, d_mlp).to(device)
    replacement = torch.zeros(n_layers, d_mlp) if values is None else torch.as_tensor(values).float()
    replacement = replacement.to(device)
    keep = default_keep(torch.from_numpy(tokens)).numpy() if keep is None else keep
    totals = torch.zeros(len(conditions), 3, dtype=torch.float64)  # loss, KL, top-1 agreement sums
    n_scored, n_total = 0, int(keep[:, 1:].sum())
    for seq in range(0, tokens.shape[0], batch_size):
        batch = torch.from_numpy(tokens[seq:seq + batch_size].astype(np.int64)).to(device)
        scored = torch.from_numpy(keep[seq:seq + batch_size, 1:]).to(device)  # targets: the kept tokens
        targets = batch[:, 1:][scored]
        group = max(1, LOGITS_BYTES.get(device.type, LOGITS_BYTES["cpu"]) // (4 * batch.numel() * vocab))
        original = None
        for start in range(0, len(conditions), group):
            chosen = list(range(start, min(len(conditions), start + group)))
            logits = _ablated_logits(model, batch, masks[:, chosen], replacement)
            log_probs = torch.log_softmax(logits[:, :, :-1][:, scored].float(), dim=-1)  # (conditions, tokens, vocab)
            if original is None:
                original = log_probs[0]
            loss = -log_probs.gather(-1, targets[None, :, None].expand(len(chosen), -1, 1)).squeeze(-1)
            # KL of two distributions is >= 0; a negative sum is float rounding of equal ones
            kl = (original.exp() * (original - log_probs)).sum(-1).clamp_min(0)
            agree = (log_probs.argmax(-1) == original.argmax(-1)).float()
            totals[chosen] += torch.stack([loss.double().sum(1), kl.double().sum(1), agree.double().sum(1)], 1).cpu()
        n_scored += len(targets)
        if progress is not None:
            progress(n_scored, n_total)
    means = totals / max(n_scored, 1)
    index = {tuple(c): i for i, c in enumerate(conditions)}
    base = float(means[0, 0])
    results = {}
    for key, neurons in lists.items():
        loss, kl, agree = (float(v) for v in means[index[tuple(neurons)]])
        results[key] = {"n_neurons": len(neurons), "loss": loss, "delta_loss": loss - base, "kl": kl,
                        "top1_agreement": agree}
    return {"loss": base, "n_tokens": n_scored}, results


def _ablated_logits(model, batch: torch.Tensor, masks: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """Logits (conditions, batch, ctx, vocab) of the batch repeated once per condition, condition
    c's neurons (masks[:, c]) replaced by `replacement` in hook_post, at every position."""
    n = masks.shape[1]

    def ablate(layer: int):
        def replace(act, hook):
            shaped = act.reshape(n, -1, *act.shape[1:])
            chosen = masks[layer][:, None, None, :]
            return torch.where(chosen, replacement[layer].to(act.dtype), shaped).reshape(act.shape)
        return replace

    hooks = [(hook_post(layer), ablate(layer)) for layer in range(masks.shape[0]) if masks[layer].any()]
    logits = model.run_with_hooks(batch.repeat(n, 1), fwd_hooks=hooks, return_type="logits")
    return logits.reshape(n, *batch.shape, -1)


def ablate(model, tokens: np.ndarray, neurons: Neurons | pd.DataFrame, keep: np.ndarray | None = None,
           method: str = "mean", means: torch.Tensor | None = None, batch_size: int = 32) -> dict:
    """Ablate one neuron set (pairs (layer, neuron), or a table with those columns: a family of
    neurons, a single neuron) and return {"n_neurons", "loss", "delta_loss", "kl",
    "top1_agreement", "original_loss", "n_tokens"} (see ablation_metrics). For method "mean",
    `means` ((n_layers, d_mlp)) default to the mean post-activations over these tokens."""
    if method not in ABLATIONS:
        raise ValueError(f"method must be one of {', '.join(ABLATIONS)}, not {method!r}")
    if method == "mean" and means is None:
        means = mean_activations(model, tokens, keep, batch_size)
    base, results = ablation_metrics(model, tokens, keep, {"set": neurons}, means if method == "mean" else None,
                                     batch_size)
    return {**results["set"], "original_loss": base["loss"], "n_tokens": base["n_tokens"]}


NEURON_SCOPE = "neuron "  # a universal neuron ablated alone: scope `neuron <layer>:<neuron>`
NEURON_COLUMNS = ["layer", "neuron", "loss", "delta_loss", "kl", "top1_agreement"]


def neuron_table(results: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """ablation_neurons.csv: each universal neuron ablated alone, largest loss change first."""
    rows = []
    for (scope, _), r in results.items():
        if scope.startswith(NEURON_SCOPE):
            layer, neuron = map(int, scope.removeprefix(NEURON_SCOPE).split(":"))
            rows.append({"layer": layer, "neuron": neuron, **{c: r[c] for c in NEURON_COLUMNS[2:]}})
    table = pd.DataFrame(rows, columns=NEURON_COLUMNS)
    return table.sort_values("delta_loss", ascending=False, kind="stable").reset_index(drop=True)


def ablation_table(base: dict, results: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """ablation.csv: per scope of a set (the neurons alone are in neuron_table), the original
    model (condition `none`), then each set's row; no rows without sets."""
    results = {key: r for key, r in results.items() if not key[0].startswith(NEURON_SCOPE)}
    rows = []
    for scope in dict.fromkeys(scope for scope, _ in results):
        rows.append({"scope": scope, "condition": "none", "n_neurons": 0, "loss": base["loss"], "delta_loss": 0.0,
                     "kl": 0.0, "top1_agreement": 1.0})
        rows += [{"scope": s, "condition": c, **r} for (s, c), r in results.items() if s == scope]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def few_documents_warning(n_tokens: int, n_documents: int | None) -> str | None:
    """One line when the held-out tokens come from fewer than FEW_DOCUMENTS documents (None
    when they do not, or the count was not recorded)."""
    if n_documents is None or n_documents >= FEW_DOCUMENTS:
        return None
    return (f"the ablation's {n_tokens:,} held-out tokens come from only {n_documents} documents (fewer than "
            f"{FEW_DOCUMENTS}): its verdict rests on a few texts; use a dataset with more documents or a shorter "
            f"CTX_LEN")


def permutation_p(value: float, sample: np.ndarray) -> float:
    """The one-sided Monte Carlo p-value of `value` against `sample` drawn under the null,
    (1 + k) / (1 + n) with k of the n draws at least as large: the universal set counts as one
    of the draws, so p is never 0 (its smallest is 1 / (1 + n), 0.048 with 20 random sets)."""
    return (1 + int((sample >= value).sum())) / (1 + len(sample))


def ablation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """ablation_summary.csv: per scope, the universal set's delta_loss and kl against the random
    sets': mean, standard deviation (n - 1), 5 and 95 % quantiles, z-score of the universal
    value, and the permutation p-value (permutation_p)."""
    rows = []
    for scope, group in table.groupby("scope", sort=False):
        universal = group[group["condition"] == "universal"]
        randoms = group[group["condition"].str.startswith("random-")]
        if universal.empty:
            continue
        row = {"scope": scope, "n_neurons": int(universal["n_neurons"].iloc[0]), "n_random": len(randoms)}
        for metric in METRICS:
            value, sample = float(universal[metric].iloc[0]), randoms[metric].to_numpy(dtype=float)
            std = float(sample.std(ddof=1)) if len(sample) > 1 else np.nan
            row.update({f"universal_{metric}": value, f"random_{metric}_mean": float(sample.mean()),
                        f"random_{metric}_std": std, f"random_{metric}_q05": float(np.quantile(sample, 0.05)),
                        f"random_{metric}_q95": float(np.quantile(sample, 0.95)),
                        f"{metric}_z": (value - sample.mean()) / std if std > 0 else np.nan,
                        f"{metric}_p": permutation_p(value, sample)})
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
