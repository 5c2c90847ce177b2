"""Neuron families (Gurnee et al. 2024, Sections 4-5): each neuron's family from what explains
its activation (unlib.explain) and what its weights do (unlib.roles), counted among the
universal neurons against the rest; and `explain_neurons`, the entry point that does it all for
any loaded model (a notebook's, or the pipeline's NeuronFamilies task)."""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from scipy.stats import fisher_exact

from unlib.contrasts import ALPHA, holm
from unlib.explain import DEAD, EXPLAINED_VR, FeatureMatrix, VarianceReduction, explanations
from unlib.features import GROUP_FAMILY, token_features, token_pieces
from unlib.h5write import write_h5
from unlib.roles import ROLES, WeightRoles

INPUT_FAMILIES = tuple(dict.fromkeys(GROUP_FAMILY.values()))
FAMILIES = ROLES + INPUT_FAMILIES + ("unexplained", DEAD)
FAMILY_COLUMNS = ["layer", "neuron", "family", "role", "input_family", "best_feature", "best_vr"]
COUNT_COLUMNS = ["family", "n_universal", "n_rest", "n_all", "share_universal", "share_all", "odds_ratio",
                 "fisher_p", "p_holm", "enriched"]


def read_counts(path) -> pd.DataFrame:
    """family_counts.csv or families_by_checkpoint.csv, `enriched` '' where the test found no
    difference (which pandas would read as NaN)."""
    counts = pd.read_csv(path)
    counts["enriched"] = counts["enriched"].astype(object).where(counts["enriched"].notna(), "")
    return counts


def neuron_families(explained: pd.DataFrame, roles: pd.DataFrame) -> pd.DataFrame:
    """families.csv: one family per neuron: "dead" for a neuron constant over the tokens (its
    weights do nothing), else its weight role where it has one (entropy, attention deactivation,
    prediction, suppression, partition, in that order), else what explains its activation (best
    VR at least EXPLAINED_VR), else "unexplained"."""
    merged = explained.merge(roles[["layer", "neuron", "role"]], on=["layer", "neuron"])
    merged["input_family"] = merged["family"]
    has_role = (merged["role"].fillna("") != "") & (merged["input_family"] != DEAD)
    merged["family"] = np.where(has_role, merged["role"], merged["input_family"])
    return merged[FAMILY_COLUMNS]


def family_counts(families: pd.DataFrame, universal: pd.DataFrame) -> pd.DataFrame:
    """family_counts.csv: per family, how many universal neurons and how many of the rest have
    it, and whether universal neurons have it more or less often than the other live neurons: a
    two-sided Fisher exact test per family, Holm-corrected across the families present. Dead
    neurons are counted but left out of the tests (never universal, they would make every
    family look more common among universal neurons), as in universal_vs_rest.csv."""
    is_universal = families.set_index(["layer", "neuron"]).index.isin(
        list(zip(universal["layer"].astype(int), universal["neuron"].astype(int))))
    live = (families["family"] != DEAD).to_numpy()
    n_u, n_r = int((is_universal & live).sum()), int((~is_universal & live).sum())
    rows = []
    for family in FAMILIES:
        has = (families["family"] == family).to_numpy()
        a, b = int((has & is_universal).sum()), int((has & ~is_universal).sum())
        if a + b == 0:
            continue
        tested = family != DEAD and n_u and n_r
        odds, p = fisher_exact([[a, n_u - a], [b, n_r - b]]) if tested else (np.nan, np.nan)
        rows.append({"family": family, "n_universal": a, "n_rest": b, "n_all": a + b,
                     "share_universal": a / n_u if n_u else np.nan, "share_all": (a + b) / len(families),
                     "odds_ratio": odds, "fisher_p": p})
    out = pd.DataFrame(rows, columns=COUNT_COLUMNS[:-2])
    out["p_holm"] = holm(out["fisher_p"].to_numpy())
    out["enriched"] = np.where(out["p_holm"] < ALPHA, np.where(out["odds_ratio"] > 1, "more", "fewer"), "")
    return out[COUNT_COLUMNS]


def activation_chunks(model, tokens: np.ndarray, keep: np.ndarray, cache=None, batch_size: int = 32,
                      rows: int = 16384) -> Iterator[list[np.ndarray]]:
    """Every layer's MLP post-activations over the kept positions, a chunk of rows at a time:
    read from an ActivationCache of these tokens when given, else from forward passes."""
    if cache is not None:
        for start in range(0, cache.n_tokens, rows):
            yield [cache.read(layer, start, min(start + rows, cache.n_tokens)) for layer in range(cache.n_layers)]
        return
    from unlib.mlp_hooks import mlp_activations

    device = next(model.parameters()).device
    for seq in range(0, tokens.shape[0], batch_size):
        batch = torch.from_numpy(tokens[seq:seq + batch_size].astype(np.int64)).to(device)
        yield [a.cpu().numpy() for a in mlp_activations(model, batch, torch.from_numpy(keep[seq:seq + batch_size]))]


@dataclasses.dataclass
class Explained:
    """explain_neurons' result: the tables, the full VR matrices (per layer, features x
    neurons), the features' names and groups, and how the roles were decided."""

    explanations: pd.DataFrame
    roles: pd.DataFrame
    families: pd.DataFrame
    variance_reduction: list[np.ndarray]
    feature_names: list[str]
    feature_groups: list[str]
    record: dict


def write_variance_reduction(path, explained: Explained) -> None:
    """variance_reduction.h5: one (features, d_mlp) float32 dataset per layer (`layer_000`, ...),
    the features' names and groups and how the roles were decided (JSON attributes)."""
    layers = {f"layer_{layer:03d}": vr.astype(np.float32) for layer, vr in enumerate(explained.variance_reduction)}
    write_h5(path, layers,
             {"features": json.dumps(explained.feature_names), "groups": json.dumps(explained.feature_groups),
              "record": json.dumps(explained.record)})


def explain_neurons(model, tokenizer, tokens: np.ndarray, keep: np.ndarray, stats: pd.DataFrame,
                    vocabulary: np.ndarray | None = None, cache=None, batch_size: int = 32,
                    progress: Callable[[int, int], None] | None = None) -> Explained:
    """Explain every MLP neuron of `model` (a TransformerBridge) on BOS-led token sequences
    (tokens, keep as unlib.tokens writes them): VR of every feature, positional MI, weight roles
    and one family per neuron. `stats`: its neuron_stats (unlib.stats.NeuronStatsGenerator);
    `vocabulary`: the token ids its training data held (None: all); `cache`: an ActivationCache
    of these tokens, read instead of running the model."""
    features = token_features(tokens, keep, token_pieces(tokenizer))
    matrix = FeatureMatrix(features)
    accs = [VarianceReduction(matrix, model.cfg.d_mlp) for _ in range(model.cfg.n_layers)]
    for chunk in activation_chunks(model, tokens, keep, cache, batch_size):
        for acc, layer in zip(accs, chunk):
            acc.add(layer)
        if progress is not None:
            progress(accs[0].done, matrix.n)
    vr, mi, dead = zip(*(acc.result() for acc in accs))
    explained = explanations(matrix, list(vr), list(mi), list(dead))
    weights = WeightRoles(model, stats, int(tokens[0, 0]), vocabulary)
    roles = weights.table()
    record = {**weights.record(), "explained_vr": EXPLAINED_VR, "n_features": len(matrix.names),
              "n_documents": features.n_documents, "python_documents": features.n_python_documents,
              "vocabulary": "all token ids" if vocabulary is None else f"{len(vocabulary)} token ids seen in training"}
    return Explained(explained, roles, neuron_families(explained, roles), list(vr), matrix.names, matrix.groups,
                     record)
