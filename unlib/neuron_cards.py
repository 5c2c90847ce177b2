"""The data of a run report's neuron cards: for the top universal neurons, their matches in
the other models, their activations over the analysed tokens and the vocabulary they promote
and suppress."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from unlib.plots import activation_histogram_svg


def neuron_cards(model, tokenizer, tokens: np.ndarray, keep: np.ndarray, universal: pd.DataFrame,
                 pairwise: pd.DataFrame, top: int = 20, contexts: int = 5, window: tuple[int, int] = (10, 4),
                 n_vocab: int = 8, batch_size: int = 32, cache=None, families: pd.DataFrame | None = None,
                 vocabulary: np.ndarray | None = None) -> list[dict]:
    """Data for the top universal neurons' cards: per-model matches, activations over the
    dataset's kept positions (histogram, top-activating contexts), the vocabulary its output
    promotes and suppresses most (its direct logit effect W_out[n] @ W_U on the processed
    weights, over the token ids in `vocabulary`, those the training data held: a token never
    trained on has an arbitrary unembedding) and, given families.csv, its family and best
    feature. The activations come from the model's activation cache (an
    unlib.activations.ActivationCache of these tokens) when given, else from running it."""
    from unlib.mlp_hooks import mlp_activations, processed_weights

    chosen = universal.head(top)
    if chosen.empty:
        return []
    keys = list(zip(chosen["layer"].astype(int), chosen["neuron"].astype(int)))
    columns = {k: [] for k in keys}
    if cache is not None:
        for layer in sorted({layer for layer, _ in keys}):
            values = cache.read(layer)
            for key in keys:
                if key[0] == layer:
                    columns[key].append(values[:, key[1]])
    else:
        device = next(model.parameters()).device
        for seq in range(0, tokens.shape[0], batch_size):
            batch = torch.from_numpy(tokens[seq:seq + batch_size].astype(np.int64)).to(device)
            layers = mlp_activations(model, batch, torch.from_numpy(keep[seq:seq + batch_size]))
            for layer, neuron in keys:
                columns[(layer, neuron)].append(layers[layer][:, neuron].cpu().numpy())
    positions = np.argwhere(keep)  # (sequence, position) of each activation row, row-major like the mask
    weights = processed_weights(model)
    ids = torch.arange(weights["W_U"].shape[1]) if vocabulary is None else torch.as_tensor(vocabulary)
    family = {} if families is None else families.set_index(["layer", "neuron"]).to_dict(orient="index")
    cards = []
    for row, key in zip(chosen.itertuples(index=False), keys):
        layer, neuron = key
        acts = np.concatenate(columns[key])
        order = np.argsort(-acts)
        shown, seen = [], set()
        for index in order:
            seq, pos = (int(v) for v in positions[index])
            if (seq, pos // 8) in seen:  # one context per neighbourhood
                continue
            seen.add((seq, pos // 8))
            before = tokenizer.decode(tokens[seq, max(1, pos - window[0]):pos].tolist())
            token = tokenizer.decode([int(tokens[seq, pos])])
            after = tokenizer.decode(tokens[seq, pos + 1:pos + 1 + window[1]].tolist())
            shown.append({"before": before, "token": token, "after": after, "activation": float(acts[index])})
            if len(shown) == contexts:
                break
        logits = weights["W_out"][layer, neuron] @ weights["W_U"][:, ids]
        promoted = [tokenizer.decode([int(ids[i])]) for i in torch.topk(logits, n_vocab).indices]
        suppressed = [tokenizer.decode([int(ids[i])]) for i in torch.topk(-logits, n_vocab).indices]
        labels = family.get(key, {})
        matches = pairwise[(pairwise["layer"] == layer) & (pairwise["neuron"] == neuron)]
        cards.append({"layer": layer, "neuron": neuron, "excess": float(row.excess_correlation),
                      "ci": (float(row.excess_ci_low), float(row.excess_ci_high)),
                      "halves": (float(row.excess_half_a), float(row.excess_half_b)),
                      "matches": matches[["other_model", "max_corr", "max_layer", "max_neuron", "baseline_max_corr"]],
                      "histogram": activation_histogram_svg(acts, f"L{layer}.{neuron} activations"),
                      "contexts": shown, "promoted": promoted, "suppressed": suppressed,
                      **{k: labels[k] for k in ("family", "best_feature", "best_vr") if k in labels}})
    return cards
