"""Weight statistics and neuron cards on the processed weights (LayerNorm folded, writing weights
and unembedding centred, as HookedTransformer loads models), checked against a numpy float64 fold
of the raw Hugging Face state dict, on small random GPT-2 and GPT-NeoX (Pythia-style) models."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from unlib.exclusion import kept_positions
from unlib.mlp_hooks import mlp_activations
from unlib.model_loading import load_model
from unlib.model_sets import ModelSpec
from unlib.neuron_cards import neuron_cards
from unlib.stats import NeuronStatsGenerator

WEIGHT_COLUMNS = ["w_in_norm", "w_out_norm", "l2_penalty", "input_bias", "in_out_sim",
                  "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"]
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
# Where each architecture keeps the MLP's LayerNorm, input and output projections, and final norm.
LAYOUTS = {
    "gpt2": {"ln2": "transformer.h.{}.ln_2", "fc_in": "transformer.h.{}.mlp.c_fc",
             "fc_out": "transformer.h.{}.mlp.c_proj", "ln_f": "transformer.ln_f", "conv1d": True},
    "gpt_neox": {"ln2": "gpt_neox.layers.{}.post_attention_layernorm", "fc_in": "gpt_neox.layers.{}.mlp.dense_h_to_4h",
                 "fc_out": "gpt_neox.layers.{}.mlp.dense_4h_to_h", "ln_f": "gpt_neox.final_layer_norm",
                 "conv1d": False},
}


def save_random_model(arch: str, path: Path, seed: int = 0) -> Path:
    """A 2-layer random model saved with save_pretrained, its LayerNorms and biases perturbed:
    fresh LayerNorms are 1 and 0, for which a missing or wrong fold would go unnoticed."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=97, n_positions=32,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                 intermediate_size=64, vocab_size=97, max_position_embeddings=32,
                                                 rotary_pct=0.25, use_parallel_residual=True,
                                                 tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # LayerNorm gains and biases, projection biases
                param.add_(0.5 * torch.randn_like(param))
    model.save_pretrained(str(path))
    return path


def reference_fold(model_dir: Path) -> dict:
    """W_in, b_in, W_out per layer and W_U, processed as HookedTransformer does, in numpy float64:
    W_in' = diag(ln2.w) W_in centred over d_model, b_in' = b_in + ln2.b W_in, W_out' = W_out centred
    over d_model, W_U' = diag(ln_f.w) W_U centred over d_model, then over the vocabulary."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    layout = LAYOUTS[model.config.model_type]
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    orient = (lambda w: w) if layout["conv1d"] else (lambda w: w.T)  # to (inputs, outputs)
    fold = {"W_in": [], "b_in": [], "W_out": []}
    for layer in range(model.config.num_hidden_layers):
        ln2, fc_in, fc_out = (layout[k].format(layer) for k in ("ln2", "fc_in", "fc_out"))
        w_in = orient(sd[f"{fc_in}.weight"])                   # (d_model, d_mlp)
        scaled = sd[f"{ln2}.weight"][:, None] * w_in
        fold["W_in"].append(scaled - scaled.mean(0, keepdims=True))
        fold["b_in"].append(sd[f"{fc_in}.bias"] + sd[f"{ln2}.bias"] @ w_in)
        w_out = orient(sd[f"{fc_out}.weight"])                 # (d_mlp, d_model)
        fold["W_out"].append(w_out - w_out.mean(1, keepdims=True))
    w_u = sd[f"{layout['ln_f']}.weight"][:, None] * sd["lm_head.weight"].T   # (d_model, vocab)
    w_u = w_u - w_u.mean(0, keepdims=True)
    fold["W_U"] = w_u - w_u.mean(1, keepdims=True)
    return fold


def reference_weight_stats(model_dir: Path) -> pd.DataFrame:
    """The weight columns of neuron_stats.csv from `reference_fold`, with scipy's moments
    (population variance, Pearson kurtosis)."""
    fold = reference_fold(model_dir)
    w_u_unit = fold["W_U"] / np.linalg.norm(fold["W_U"], axis=0)
    frames = []
    for layer, (w_in, b_in, w_out) in enumerate(zip(fold["W_in"], fold["b_in"], fold["W_out"])):
        in_norm, out_norm = np.linalg.norm(w_in, axis=0), np.linalg.norm(w_out, axis=1)
        cos = (w_out / out_norm[:, None]) @ w_u_unit
        frames.append(pd.DataFrame({
            "layer": layer, "neuron": np.arange(len(b_in)), "w_in_norm": in_norm, "w_out_norm": out_norm,
            "l2_penalty": in_norm ** 2 + out_norm ** 2, "input_bias": b_in,
            "in_out_sim": (w_in.T * w_out).sum(1) / (in_norm * out_norm),
            "vocab_mean": cos.mean(1), "vocab_var": cos.var(1), "vocab_skew": scipy.stats.skew(cos, axis=1),
            "vocab_kurt": scipy.stats.kurtosis(cos, axis=1, fisher=False)}))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox"])
def toy(request, tmp_path_factory):
    path = save_random_model(request.param, tmp_path_factory.mktemp(request.param) / "model")
    return {"dir": path, "model": load_model(ModelSpec(request.param, str(path)), None)}


def test_weight_stats_match_a_numpy_fold_of_the_raw_weights(toy):
    stats = NeuronStatsGenerator(toy["model"]).weight_stats()
    expected = reference_weight_stats(toy["dir"])
    assert len(stats) == len(expected) == 2 * 64
    assert (stats[["layer", "neuron"]].values == expected[["layer", "neuron"]].values).all()
    for column in WEIGHT_COLUMNS:
        np.testing.assert_allclose(stats[column], expected[column], **TOLERANCE, err_msg=column)
    # The fold matters here: the raw input bias is far from the folded one.
    raw_bias = toy["model"].b_in.detach().double().flatten().numpy()
    assert np.abs(raw_bias - expected["input_bias"].values).max() > 0.1


def test_statistics_leave_the_model_raw(toy):
    model = toy["model"]
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    before = [a.clone() for a in mlp_activations(model, tokens)]
    raw = {name: getattr(model, name).detach().clone() for name in ("W_in", "b_in", "W_out", "W_U")}
    NeuronStatsGenerator(model).weight_stats()
    assert all(torch.equal(getattr(model, name), value) for name, value in raw.items())
    assert all(torch.equal(a, b) for a, b in zip(before, mlp_activations(model, tokens)))


class IdTokenizer:
    def decode(self, ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)


def test_neuron_cards_rank_the_vocabulary_with_the_processed_weights(toy):
    fold = reference_fold(toy["dir"])
    keys = [(0, 3), (1, 10), (1, 40)]
    universal = pd.DataFrame({"layer": [l for l, _ in keys], "neuron": [n for _, n in keys],
                              "excess_correlation": [0.9, 0.8, 0.7], "excess_ci_low": 0.5, "excess_ci_high": 0.95,
                              "excess_half_a": 0.7, "excess_half_b": 0.8})
    pairwise = pd.DataFrame({"layer": [l for l, _ in keys], "neuron": [n for _, n in keys], "other_model": "b",
                             "max_corr": 0.9, "max_layer": 0, "max_neuron": 0, "baseline_max_corr": 0.1})
    tokens = np.random.default_rng(0).integers(1, 97, (4, 16)).astype(np.int32)
    cards = neuron_cards(toy["model"], IdTokenizer(), tokens, kept_positions(tokens, []), universal, pairwise,
                         contexts=2)
    model = toy["model"]
    raw_differs = False
    for card, (layer, neuron) in zip(cards, keys):
        logits = fold["W_out"][layer][neuron] @ fold["W_U"]
        order = np.argsort(-logits)
        assert card["promoted"] == [f"t{i}" for i in order[:8]]
        assert card["suppressed"] == [f"t{i}" for i in order[::-1][:8]]
        raw = (model.W_out[layer][neuron] @ model.W_U).detach().numpy()
        raw_differs |= card["promoted"] != [f"t{i}" for i in np.argsort(-raw)[:8]]
    assert raw_differs, "the raw weights rank the vocabulary the same way: the test would not see a raw W_U"


def test_neuron_cards_list_only_tokens_the_training_data_held(toy):
    """Given the training vocabulary, promoted and suppressed tokens are the top and bottom of
    the direct logit effect over those ids only (a never-trained token's unembedding is noise)."""
    fold = reference_fold(toy["dir"])
    universal = pd.DataFrame({"layer": [1], "neuron": [10], "excess_correlation": [0.9], "excess_ci_low": 0.5,
                              "excess_ci_high": 0.95, "excess_half_a": 0.7, "excess_half_b": 0.8})
    pairwise = pd.DataFrame({"layer": [1], "neuron": [10], "other_model": "b", "max_corr": 0.9, "max_layer": 0,
                             "max_neuron": 0, "baseline_max_corr": 0.1})
    tokens = np.random.default_rng(0).integers(1, 97, (4, 16)).astype(np.int32)
    vocabulary = np.arange(1, 97, 3)
    families = pd.DataFrame({"layer": [1], "neuron": [10], "family": ["unigram"], "best_feature": ["'x'"],
                             "best_vr": [0.4]})
    (card,) = neuron_cards(toy["model"], IdTokenizer(), tokens, kept_positions(tokens, []), universal, pairwise,
                           contexts=2, vocabulary=vocabulary, families=families)
    logits = fold["W_out"][1][10] @ fold["W_U"]
    order = vocabulary[np.argsort(-logits[vocabulary])]
    assert card["promoted"] == [f"t{i}" for i in order[:8]]
    assert card["suppressed"] == [f"t{i}" for i in order[::-1][:8]]
    assert card["promoted"] != [f"t{i}" for i in np.argsort(-logits)[:8]]  # the whole vocabulary ranks otherwise
    assert (card["family"], card["best_feature"], card["best_vr"]) == ("unigram", "'x'", 0.4)
