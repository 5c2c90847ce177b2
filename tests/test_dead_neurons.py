"""Planted dead neurons, end to end through the command line: a neuron whose pre-activation is
constant (W_in column zero, a bias) and one whose post-activation is (a bias so negative that
GELU gives 0 at every token). Neither may claim a best match, their statistics must be finite,
and run.json and the report must count them."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import analyze_folders_a_and_b
from unlib.stats import CONSTANT_KURT, CONSTANT_SKEW, STATS_COLUMNS
from unlib.zoo import train_tokenizer

D_MLP, N_TOKENS = 48, 4096
CONSTANT_PRE = (0, 5)  # layer, neuron: pre-activation 0.75 at every token
CONSTANT_POST = (1, 3)  # pre-activation about -1000, post-activation GELU = 0 at every token
DEAD_IN_OTHER = (0, 9)  # dead in model b, which is not the reference


def kill(model, layer: int, neuron: int, bias: float, zero_weights: bool) -> None:
    mlp = model.transformer.h[layer].mlp
    with torch.no_grad():
        if zero_weights:
            mlp.c_fc.weight[:, neuron] = 0
        mlp.c_fc.bias[neuron] = bias


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dead")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "x", "y", "=", "+", "(", ")", ":"]
    texts = [" ".join(rng.choice(words, size=rng.integers(5, 40))) for _ in range(600)]
    tokenizer = train_tokenizer(texts, 300, 10**6, root / "tokenizer")
    config = GPT2Config(n_layer=2, n_embd=32, n_inner=D_MLP, n_head=4, n_positions=32, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.bos_token_id)
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        if name == "a":
            kill(model, *CONSTANT_PRE, bias=0.75, zero_weights=True)
            kill(model, *CONSTANT_POST, bias=-1000.0, zero_weights=False)
        else:
            kill(model, *DEAD_IN_OTHER, bias=0.5, zero_weights=True)
        model.save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
    # THRESHOLD=-1 would select every neuron: the dead ones must still be left out
    store, stdout = analyze_folders_a_and_b(root, texts, "--n-tokens", str(N_TOKENS), "--threshold", "-1")
    results = next(store.glob("results/*/final*"))
    return {"dir": results, "stdout": stdout, "run": json.loads((results / "run.json").read_text()),
            **{name: pd.read_csv(results / f"{file}.csv") for name, file in [
                ("excess", "excess_correlation_scores"), ("pairwise", "pairwise_correlations"),
                ("stats", "neuron_stats"), ("universal", "universal_neurons")]}}


def at(df: pd.DataFrame, key: tuple[int, int]) -> pd.DataFrame:
    return df[(df["layer"] == key[0]) & (df["neuron"] == key[1])]


def test_dead_neurons_are_marked_and_claim_no_best_match(run):
    excess = run["excess"]
    dead = set(zip(excess.loc[excess["dead"], "layer"], excess.loc[excess["dead"], "neuron"]))
    assert dead == {CONSTANT_PRE, CONSTANT_POST}, "a neuron dead in another model is not the reference's"
    for key in (CONSTANT_PRE, CONSTANT_POST):
        row = at(excess, key).iloc[0]
        assert row["max_corr"] == 0 and row["mean_baseline"] == 0 and row["excess_correlation"] == 0
        pairs = at(run["pairwise"], key)
        assert (pairs["max_layer"] == -1).all() and (pairs["max_neuron"] == -1).all() and (pairs["max_corr"] == 0).all()
    alive = run["pairwise"][~run["pairwise"].set_index(["layer", "neuron"]).index.isin(list(dead))]
    assert (alive["max_layer"] >= 0).all() and (alive["max_neuron"] >= 0).all()
    assert np.isfinite(excess.drop(columns="dead").to_numpy(dtype=float)).all()


def test_dead_neurons_have_finite_statistics(run):
    stats = run["stats"]
    assert np.isfinite(stats[STATS_COLUMNS].to_numpy(dtype=float)).all()
    constant = at(stats, CONSTANT_PRE).iloc[0]
    assert constant["act_mean"] == pytest.approx(0.75) and constant["act_var"] == 0
    assert constant["act_skew"] == CONSTANT_SKEW and constant["act_kurt"] == CONSTANT_KURT
    assert constant["sparsity"] == 1.0
    # dead after GELU only: its pre-activation varies, and its moments are the ordinary ones
    post = at(stats, CONSTANT_POST).iloc[0]
    assert post["act_var"] > 0 and post["act_mean"] < -900 and post["sparsity"] == 0


def test_dead_neurons_are_never_universal_and_are_counted(run):
    universal = set(zip(run["universal"]["layer"], run["universal"]["neuron"]))
    assert len(universal) == 2 * D_MLP - 2 and not universal & {CONSTANT_PRE, CONSTANT_POST}
    record = run["run"]
    assert record["n_dead"] == 2 and record["n_neurons"] == 2 * D_MLP
    assert [layer["n_dead"] for layer in record["layers"]] == [1, 1]
    html = (run["dir"] / "report.html").read_text()
    assert '<span id="n-dead">2</span>' in html
    assert "dead" in run["stdout"]
