"""The paper's published universal-neuron tables (Gurnee et al. 2024, in reference_data/), and
how a run's universal set compares with them: whether its setup matches the paper's, and its
rank recall."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

REFERENCE_DATA = Path(__file__).resolve().parent / "reference_data"
# Published universal-neuron tables (Gurnee et al. 2024): the file, the neurons it covers,
# the model it scores (the set's first seed) and that model's final training step.
PUBLISHED = {"stanford-gpt2-small": ("gurnee2024_stanford-gpt2-small-a_universal.csv", 12 * 3072,
                                     "stanford-crfm/alias-gpt2-small-x21", 400_000),
             "stanford-gpt2-medium": ("gurnee2024_stanford-gpt2-medium-a_universal.csv", 24 * 4096,
                                      "stanford-crfm/arwen-gpt2-medium-x21", 400_000),
             "pythia-160m": ("gurnee2024_pythia-160m_universal.csv", 12 * 3072, "EleutherAI/pythia-160m", 143_000)}
# Below this many analysed tokens a run's universal set is too noisy to set beside the paper's
# (which used 100 million); the split-half interval shows how noisy.
PAPER_MIN_TOKENS = 1_000_000


def published_reference(model_set: str) -> dict | None:
    """The paper's universal-neuron table for a model set (seed a), if there is one."""
    if model_set not in PUBLISHED:
        return None
    name, n_neurons, model, final_step = PUBLISHED[model_set]
    table = pd.read_csv(REFERENCE_DATA / name)
    return {"file": name, "table": table, "n_universal": len(table), "n_neurons": n_neurons, "model": model,
            "final_step": final_step, "fraction": len(table) / n_neurons, "per_layer": table.groupby("layer").size()}


def paper_setup_differences(run: dict, published: dict) -> list[str]:
    """Why a run's universal set cannot be set beside the paper's: each way its setup differs
    (empty when it matches: final weights, threshold 0.5, no top-k, the paper's tokens)."""
    from unlib.model_sets import PAPER_DEFAULTS

    reasons = []
    if run.get("checkpoint") not in (None, published["final_step"]):
        reasons.append(f"it analyses training step {run['checkpoint']}, the paper the final weights")
    if run.get("top_k") is not None:
        reasons.append(f"it selects the top {run['top_k']} neurons, the paper those with excess >= 0.5")
    elif run["threshold"] != PAPER_DEFAULTS.threshold:
        reasons.append(f"its threshold is {run['threshold']}, the paper's {PAPER_DEFAULTS.threshold}")
    if set(run.get("exclude_tokens", "").split(",")) != set(PAPER_DEFAULTS.exclude_tokens.split(",")):
        reasons.append(f"it excludes {run.get('exclude_tokens')!r}, the paper BOS/EOS/pad and newline positions")
    if run.get("ctx_len") != PAPER_DEFAULTS.ctx_len:
        reasons.append(f"its contexts are {run.get('ctx_len')} tokens, the paper's {PAPER_DEFAULTS.ctx_len}")
    if "pile" not in str(run.get("dataset", "")).lower():
        reasons.append(f"its text is {run.get('dataset')}, the paper's the Pile")
    if run.get("n_tokens", 0) < PAPER_MIN_TOKENS:
        reasons.append(f"it analyses {run.get('n_tokens', 0):,} tokens, fewer than {PAPER_MIN_TOKENS:,} "
                       f"(the paper used 100 million)")
    return reasons


def rank_recall(excess: pd.DataFrame, published_table: pd.DataFrame) -> float:
    """Threshold-free agreement with the paper: the fraction of its universal neurons found
    among this run's k highest excess correlations, k = the number it published."""
    k = len(published_table)
    top = excess.sort_values("excess_correlation", ascending=False, kind="stable").head(k)
    found = set(zip(top["layer"], top["neuron"])) & set(zip(published_table["layer"], published_table["neuron"]))
    return len(found) / max(k, 1)
