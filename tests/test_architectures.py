"""The real model families, proven end to end on small local models built with `transformers`
(the hub is unreachable here): GPT-2 with the Stanford CRFM flags, GPT-NeoX as Pythia uses it
(parallel residual, rotary, `step<N>` checkpoint folders) in a set mixing depths and widths,
and a gated-MLP Llama-style decoder. Each set runs through Luigi (`python -m tasks analyze`),
and its outputs are checked against the Hugging Face modules run directly, in numpy float64."""
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from test_weight_stats import TOLERANCE, WEIGHT_COLUMNS, reference_weight_stats
from unlib.model_sets import ModelSpec

REPO = Path(__file__).resolve().parent.parent
N_TOKENS = 4096
VOCAB = 400


def gpt2(seed: int, tokenizer, n_layer: int = 2, d_mlp: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, n_inner=d_mlp, n_positions=64,
                                      vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0,
                                      scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True))


def neox(seed: int, tokenizer, n_layer: int = 2, d_mlp: int = 64):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=n_layer, hidden_size=32, num_attention_heads=4,
                                            intermediate_size=d_mlp, max_position_embeddings=64, rotary_pct=0.25,
                                            use_parallel_residual=True, tie_word_embeddings=False,
                                            vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0))


def llama(seed: int, tokenizer, n_layer: int = 2, d_mlp: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=n_layer, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=d_mlp, max_position_embeddings=64,
                                        vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0))


def save(model, tokenizer, path: Path) -> Path:
    """Save with the tokenizer, norms and biases perturbed (fresh ones are 1 and 0, for which
    a missing or wrong fold would go unnoticed)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.5 * torch.randn_like(param))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def analyze(store: Path, models: list[Path], *args: str) -> Path:
    """Run the pipeline on a list of model folders (fp32 products: numpy float64's numbers to
    float32 rounding); the results folder."""
    env = {**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tasks", "analyze", "--scheduler", "local", "--device", "cpu",
                           "--precision", "fp32", "--models", ",".join(map(str, models)), "--dataset", "python-stdlib",
                           "--n-tokens", str(N_TOKENS), "--threshold", "0.3", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (results,) = {p.parent for p in store.glob("results/*/*/excess_correlation_scores.csv")}
    return results


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from unlib.dataset import offline_corpus
    from unlib.zoo import train_tokenizer

    return train_tokenizer(offline_corpus("train")["text"][:200], VOCAB, 10**6, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=["gpt2-stanford", "neox-pythia-mixed", "llama"])
def run(request, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = []
    if request.param == "gpt2-stanford":
        folders = [save(gpt2(s, tokenizer), tokenizer, root / f"seed{s}") for s in (0, 1)]
        models = folders
    elif request.param == "llama":
        folders = [save(llama(s, tokenizer), tokenizer, root / f"seed{s}") for s in (0, 1)]
        models = folders
    else:  # Pythia's layout: one folder per model, a `step<N>` subfolder per checkpoint
        shapes = [(2, 64), (1, 96), (3, 32)]  # (layers, d_mlp): depths and widths mixed
        models = [root / f"seed{s}" for s in range(3)]
        for s, (n_layer, d_mlp) in enumerate(shapes):
            for step in (0, 100):
                save(neox(10 * s + step, tokenizer, n_layer, d_mlp), tokenizer, models[s] / f"step{step}")
        folders = [m / "step100" for m in models]
        checkpoint = ["--checkpoint", "100"]
    store = root / "store"
    results = analyze(store, models, *checkpoint)
    with h5py.File(next(store.glob("tokens/*/*.h5")), "r") as f:
        tokens = torch.from_numpy(f["tokens"][:].astype(np.int64))
        keep = torch.from_numpy(f["keep"][:])
    caches = []
    for model in models:
        (cache,) = store.glob(f"activations/{ModelSpec(str(model), str(model)).model_id}/*/*.h5")
        with h5py.File(cache, "r") as f:
            caches.append([f[name][:] for name in sorted(f) if name.startswith("layer_") and "." not in name])
    direct = [direct_activations(folder, tokens, keep) for folder in folders]
    return {"kind": request.param, "folders": folders, "models": [str(m) for m in models], "results": results,
            "caches": caches, "direct": direct, "tokens": tokens, "keep": keep}


def mlp_modules(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Per layer, the Hugging Face module computing the MLP's pre-activation (the gate, for a
    gated MLP) and the output projection, whose input is the MLP's activation."""
    kind = model.config.model_type
    if kind == "gpt2":
        return [(b.mlp.c_fc, b.mlp.c_proj) for b in model.transformer.h]
    if kind == "gpt_neox":
        return [(b.mlp.dense_h_to_4h, b.mlp.dense_4h_to_h) for b in model.gpt_neox.layers]
    return [(b.mlp.gate_proj, b.mlp.down_proj) for b in model.model.layers]


@torch.no_grad()
def direct_activations(folder: Path, tokens: torch.Tensor, keep: torch.Tensor) -> dict[str, list[np.ndarray]]:
    """MLP pre- and post-activations at the kept positions, from PyTorch hooks on the Hugging
    Face modules (not TransformerLens), float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    pre, post = {}, {}
    for start in range(0, tokens.shape[0], 32):
        rows, hooks = slice(start, start + 32), []
        for layer, (into, out) in enumerate(mlp_modules(model)):
            hooks.append(into.register_forward_hook(
                lambda m, i, o, l=layer, k=keep[rows]: pre.setdefault(l, []).append(o[k])))
            hooks.append(out.register_forward_pre_hook(
                lambda m, i, l=layer, k=keep[rows]: post.setdefault(l, []).append(i[0][k])))
        model(tokens[rows])
        for h in hooks:
            h.remove()
    stack = lambda d: [torch.cat(d[l]).double().numpy() for l in sorted(d)]  # noqa: E731
    return {"pre": stack(pre), "post": stack(post)}


def test_cached_activations_equal_the_hugging_face_mlp(run):
    """`hook_post` in the cache is the input of the MLP's output projection, within float32 noise."""
    worst = 0.0
    for cache, direct in zip(run["caches"], run["direct"]):
        assert len(cache) == len(direct["post"])
        for cached, expected in zip(cache, direct["post"]):
            assert cached.shape == expected.shape
            error = np.abs(cached.astype(np.float64) - expected)
            assert (error <= 1e-5 * np.abs(expected) + 1e-6).all()
            worst = max(worst, error.max())
    print(f"{run['kind']}: max |cache - Hugging Face| = {worst:.2e}")


def test_max_correlations_equal_numpy_float64(run):
    """Each reference neuron's best match in every other model (all its layers, whatever their
    number and width), from numpy float64 on the Hugging Face activations."""
    pairwise = pd.read_csv(run["results"] / "pairwise_correlations.csv")
    ref = run["direct"][0]["post"]
    widths = [x.shape[1] for x in ref]
    worst = 0.0
    for other_name, other in zip(run["models"][1:], run["direct"][1:]):
        y = np.concatenate(other["post"], axis=1)
        for layer, x in enumerate(ref):
            corr = np.corrcoef(x.T, y.T)[:widths[layer], widths[layer]:]
            rows = pairwise[(pairwise.other_model == other_name) & (pairwise.layer == layer)]
            assert len(rows) == widths[layer]
            worst = max(worst, np.abs(rows["max_corr"].values - corr.max(axis=1)).max())
    assert worst <= 1e-4
    print(f"{run['kind']}: max |max_corr - float64| = {worst:.2e}")


def test_neuron_statistics_equal_an_independent_computation(run):
    stats = pd.read_csv(run["results"] / "neuron_stats.csv")
    pre = run["direct"][0]["pre"]
    assert len(stats) == sum(x.shape[1] for x in pre)
    for layer, acts in enumerate(pre):  # on hook_pre: the gate's pre-activation in a gated MLP
        rows = stats[stats.layer == layer]
        np.testing.assert_allclose(rows["act_mean"], acts.mean(0), atol=1e-4)
        np.testing.assert_allclose(rows["sparsity"], (acts > 0).mean(0), atol=1e-6)
    if run["kind"] == "llama":
        # the gate, RMSNorm gain folded in (no centring: RMSNorm does not subtract the mean), no bias
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(run["folders"][0]))
        for layer, block in enumerate(model.model.layers):
            gain = block.post_attention_layernorm.weight.detach().double().numpy()
            gate = gain[:, None] * block.mlp.gate_proj.weight.detach().double().numpy().T   # (d_model, d_mlp)
            w_out = block.mlp.down_proj.weight.detach().double().numpy().T                   # (d_mlp, d_model)
            in_norm, out_norm = np.linalg.norm(gate, axis=0), np.linalg.norm(w_out, axis=1)
            rows = stats[stats.layer == layer]
            np.testing.assert_allclose(rows["w_in_norm"], in_norm, rtol=1e-5)
            np.testing.assert_allclose(rows["w_out_norm"], out_norm, rtol=1e-5)
            np.testing.assert_allclose(rows["in_out_sim"], (gate.T * w_out).sum(1) / (in_norm * out_norm), atol=1e-5)
            assert (rows["input_bias"] == 0).all()
    else:
        expected = reference_weight_stats(run["folders"][0])
        for column in WEIGHT_COLUMNS:
            np.testing.assert_allclose(stats[column], expected[column], **TOLERANCE, err_msg=column)
