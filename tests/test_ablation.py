"""Ablation of neuron sets: the hooks against the same ablation done by editing the Hugging Face
model's weights (each neuron's output-weight row zeroed, its mean contribution added to the
output bias), the invariants (nothing ablated, neurons that write nothing, KL >= 0), the matched
random sets, and an end-to-end run on the mini zoo whose CSVs and report section agree."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from test_weight_stats import LAYOUTS, save_random_model
from unlib.ablation import (SUMMARY_COLUMNS, TABLE_COLUMNS, ablate, ablation_metrics, ablation_sets, layer_counts,
                            mean_activations, random_sets)
from unlib.data import kept_positions
from unlib.models import ModelSpec, load_model

REPO = Path(__file__).resolve().parent.parent
CTX = 32


def loud_random_neox(folder: Path) -> Path:
    """A random GPT-NeoX (Linear output projections, parallel residual) whose MLP outputs and
    unembedding are scaled up, so that ablating a few neurons moves its predictions measurably."""
    from transformers import AutoModelForCausalLM

    save_random_model("gpt_neox", folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        for layer in range(2):
            model.get_submodule(LAYOUTS["gpt_neox"]["fc_out"].format(layer)).weight.mul_(20)
        model.get_output_embeddings().weight.mul_(10)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=["mini-zoo", "gpt_neox"])
def toy(request, tmp_path_factory):
    """A trained GPT-2 (the mini zoo's seed 0 at step 300) and a random GPT-NeoX, loaded as
    TransformerBridges, and tokens with a few excluded positions (token 0 stands for an excluded
    separator)."""
    if request.param == "mini-zoo":
        folder = next(request.getfixturevalue("mini_zoo").glob("toy-zoo-mini-*/seed-0/checkpoint-300"))
    else:
        folder = loud_random_neox(tmp_path_factory.mktemp("neox") / "model")
    model = load_model(ModelSpec("toy", str(folder)), None, "cpu")
    tokens = torch.randint(1, model.cfg.d_vocab, (12, CTX), generator=torch.Generator().manual_seed(3)).numpy()
    tokens[:, 0] = 0
    tokens[::3, 7] = 0
    return {"dir": folder, "model": model, "tokens": tokens, "keep": kept_positions(tokens, [0])}


def edited_model(model_dir: Path, neurons: list[tuple[int, int]], means: torch.Tensor):
    """The Hugging Face model with mean ablation written into its weights: each neuron's
    output-weight row zeroed and its mean times that row added to the output bias."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    layout = LAYOUTS[model.config.model_type]
    with torch.no_grad():
        for layer, neuron in neurons:
            out = model.get_submodule(layout["fc_out"].format(layer))
            # GPT-2's Conv1D weight is (d_mlp, d_model); a Linear's (d_model, d_mlp)
            row = out.weight[neuron] if layout["conv1d"] else out.weight[:, neuron]
            out.bias += means[layer, neuron].float() * row
            row.zero_()
    return model


def hf_loss(model, tokens: np.ndarray, keep: np.ndarray) -> float:
    """Mean next-token loss over the kept target tokens, from the Hugging Face model run directly."""
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens.astype(np.int64))).logits.double()
    log_probs = torch.log_softmax(logits[:, :-1], -1)
    targets = torch.from_numpy(tokens[:, 1:].astype(np.int64))
    losses = -log_probs.gather(-1, targets[..., None])[..., 0]
    return float(losses[torch.from_numpy(keep[:, 1:])].mean())


def test_mean_ablation_by_hooks_equals_editing_the_weights(toy):
    from transformers import AutoModelForCausalLM

    means = mean_activations(toy["model"], toy["tokens"], toy["keep"], batch_size=5)
    neurons = [(0, 3), (0, 17), (1, 5), (1, 40), (1, 63)]
    base, results = ablation_metrics(toy["model"], toy["tokens"], toy["keep"], {"set": neurons, "single": [(0, 9)]},
                                     means, batch_size=5)
    original = AutoModelForCausalLM.from_pretrained(str(toy["dir"])).eval()
    assert base["loss"] == pytest.approx(hf_loss(original, toy["tokens"], toy["keep"]), abs=1e-5)
    assert base["n_tokens"] == int(toy["keep"][:, 1:].sum())
    for key, chosen in (("set", neurons), ("single", [(0, 9)])):
        expected = hf_loss(edited_model(toy["dir"], chosen, means), toy["tokens"], toy["keep"])
        assert results[key]["loss"] == pytest.approx(expected, abs=1e-5), key
        assert results[key]["delta_loss"] == pytest.approx(expected - base["loss"], abs=1e-5)
        assert abs(results[key]["delta_loss"]) > 1e-4, "the ablation must change something to be tested"
    # the one-set convenience for notebooks gives the same figures
    single = ablate(toy["model"], toy["tokens"], pd.DataFrame({"layer": [1, 0, 1, 1, 0], "neuron": [5, 3, 40, 63, 17]}),
                    toy["keep"], means=means)
    assert single["loss"] == pytest.approx(results["set"]["loss"], abs=1e-6) and single["n_neurons"] == 5


def test_nothing_ablated_and_neurons_that_write_nothing_change_nothing(toy, tmp_path):
    from transformers import AutoModelForCausalLM

    silent = [(0, 2), (0, 30), (1, 11)]
    hf = AutoModelForCausalLM.from_pretrained(str(toy["dir"]))
    layout = LAYOUTS[hf.config.model_type]
    with torch.no_grad():
        for layer, neuron in silent:
            out = hf.get_submodule(layout["fc_out"].format(layer))
            (out.weight[neuron] if layout["conv1d"] else out.weight[:, neuron]).zero_()
    hf.save_pretrained(str(tmp_path / "silent"))
    model = load_model(ModelSpec("silent", str(tmp_path / "silent")), None, "cpu")
    means = mean_activations(model, toy["tokens"], toy["keep"])
    for values in (means, None):  # mean and zero ablation
        base, results = ablation_metrics(model, toy["tokens"], toy["keep"], {"silent": silent, "nothing": []},
                                         values, batch_size=4)
        for key in ("silent", "nothing"):
            assert results[key]["delta_loss"] == pytest.approx(0, abs=1e-6)
            assert results[key]["kl"] == pytest.approx(0, abs=1e-7)
            assert results[key]["top1_agreement"] == 1.0
        assert results["nothing"]["n_neurons"] == 0 and results["silent"]["n_neurons"] == 3


def test_kl_is_never_negative(toy):
    d_mlp = toy["model"].cfg.d_mlp
    sets = {f"single {l}.{n}": [(l, n)] for l in range(2) for n in range(0, d_mlp, 8)}
    sets.update({f"random {k}": s for k, s in enumerate(random_sets([(0, 1), (1, 1), (1, 2)], d_mlp, 5, seed=4))})
    for values in (mean_activations(toy["model"], toy["tokens"], toy["keep"]), None):
        _, results = ablation_metrics(toy["model"], toy["tokens"], toy["keep"], sets, values, batch_size=12)
        kl = np.array([r["kl"] for r in results.values()])
        assert (kl >= 0).all() and (kl > 0).any()
        assert all(0 <= r["top1_agreement"] <= 1 for r in results.values())


def test_random_sets_match_the_layer_counts_and_follow_the_seed():
    universal = [(0, 1), (0, 5), (2, 7), (2, 8), (2, 9), (3, 0)]
    sets = random_sets(universal, 16, 30, seed=11)
    assert len(sets) == 30
    for drawn in sets:
        assert layer_counts(drawn) == {0: 2, 2: 3, 3: 1} and len(set(drawn)) == 6
        assert not set(drawn) & set(universal), "drawn from the neurons outside the universal set"
    assert len({tuple(s) for s in sets}) > 20, "the sets differ"
    assert random_sets(universal, 16, 30, seed=11) == sets
    assert random_sets(universal, 16, 5, seed=11) == sets[:5], "set k depends on (seed, k) only"
    assert random_sets(universal, 16, 30, seed=12) != sets
    # a layer with fewer other neurons than universal ones draws from the whole layer
    crowded = random_sets([(0, n) for n in range(3)], 4, 3, seed=0)
    assert all(layer_counts(s) == {0: 3} for s in crowded)
    conditions = ablation_sets(universal, 16, 4, seed=11)
    assert sorted({scope for scope, _ in conditions}) == ["all", "layer 0", "layer 2", "layer 3"]
    assert conditions[("layer 2", "universal")] == [(2, 7), (2, 8), (2, 9)]
    assert conditions[("layer 2", "random-1")] == [p for p in sets[1] if p[0] == 2]
    assert conditions[("all", "random-3")] == sets[3]
    assert ablation_sets([], 16, 4, seed=11) == {}
