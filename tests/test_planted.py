"""A planted answer: a model whose MLP neurons are a permutation of another's must be
found neuron for neuron; an unrelated model must not. Runs the real loader (through
TransformerBridge), the real activation cache and both engine feeds."""
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from unlib.activations import ActivationCache, cache_activations, cached_chunks
from unlib.engine.halves import HalfSplit
from unlib.exclusion import kept_positions
from unlib.model_loading import load_model
from unlib.model_sets import ModelSpec
from unlib.notebook import MemoryEfficientExcessCorrelationComputer, run_engine
from unlib.tokens import document_starts
from unlib.zoo import train_tokenizer

N_LAYERS, D_MODEL, D_MLP, VOCAB = 2, 32, 48, 300


def save_model(model, tokenizer, path):
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def permute_mlp_neurons(model, perms):
    """Permute each layer's MLP neurons: columns of c_fc (and its bias), rows of c_proj.
    The network computes the same function."""
    with torch.no_grad():
        for block, perm in zip(model.transformer.h, perms):
            block.mlp.c_fc.weight.copy_(block.mlp.c_fc.weight[:, perm])
            block.mlp.c_fc.bias.copy_(block.mlp.c_fc.bias[perm])
            block.mlp.c_proj.weight.copy_(block.mlp.c_proj.weight[perm, :])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    text = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 200
    tokenizer = train_tokenizer(text, VOCAB, 10**6, root / "tokenizer")
    config = GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_inner=D_MLP, n_head=4, n_positions=32,
                        vocab_size=len(tokenizer), resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)
    save_model(base, tokenizer, root / "a")
    rng = np.random.default_rng(0)
    perms = [rng.permutation(D_MLP) for _ in range(N_LAYERS)]
    permute_mlp_neurons(base, perms)
    save_model(base, tokenizer, root / "b")
    torch.manual_seed(1)
    save_model(GPT2LMHeadModel(config), tokenizer, root / "c")
    # 160 x 31 = 4960 analysed tokens, one document (no separator but the BOS of column 0): cut
    # into four pieces, two in each half, as the no-cache feed of the notebook API splits them
    tokens = rng.integers(1, len(tokenizer), size=(160, 32)).astype(np.int32)
    tokens[:, 0] = tokenizer.bos_token_id
    models = [load_model(ModelSpec(n, str(root / n)), None) for n in "abc"]
    caches = []
    for name, model in zip("abc", models):
        cache_activations(model, tokens, kept_positions(tokens, []), root / f"{name}.h5", {"model": name},
                          batch_size=16)
        caches.append(ActivationCache(root / f"{name}.h5"))
    sizes = [[D_MLP] * N_LAYERS] * 3
    split = HalfSplit.by_document(document_starts(tokens, kept_positions(tokens, []), tokenizer.bos_token_id),
                                  caches[0].n_tokens)
    assert split.record()["cut_documents"] == 1 and split.halves.tolist() == [0, 1, 0, 1]
    results = run_engine(lambda needed: cached_chunks(caches, 1000), sizes, reference=0, n_rotations=3, split=split,
                         precision="fp32")
    return {"perms": perms, "results": results, "models": models, "tokens": tokens, "caches": caches}


def test_permuted_model_is_found_neuron_for_neuron(planted):
    for result in planted["results"]:
        k = result.others.index(1)
        assert np.all(result.max_corr[k] >= 1 - 1e-3)
        inverse = np.argsort(planted["perms"][result.layer])  # neuron n of a is neuron inverse[n] of b
        assert np.array_equal(result.max_layer[k], np.full(D_MLP, result.layer))
        assert np.array_equal(result.max_neuron[k], inverse)
        assert np.all(result.baseline_max_corr[k] < 0.999)


def test_unrelated_model_is_not_a_copy(planted):
    for result in planted["results"]:
        k = result.others.index(2)
        assert np.median(result.max_corr[k]) < 0.99
        assert np.mean(result.max_corr[k] > 1 - 1e-3) < 0.05


def test_cache_holds_float32_activations_without_bos(planted):
    cache = planted["caches"][0]
    assert cache.layers == ["layer_000", "layer_001"]
    assert cache.n_tokens == 160 * 31
    from unlib.mlp_hooks import mlp_activations
    direct = mlp_activations(planted["models"][0], torch.from_numpy(planted["tokens"][:4].astype(np.int64)))
    np.testing.assert_allclose(cache.read(1, 0, 4 * 31), direct[1].numpy(), rtol=0, atol=0)


def test_no_cache_feed_gives_the_cached_numbers(planted):
    computer = MemoryEfficientExcessCorrelationComputer(planted["models"], labels=list("abc"))
    # fp32 products: the feeds' float32 rounding differs, which bf16 would round further
    streamed = computer.compute_results(planted["tokens"], reference=0, n_rotations=3, precision="fp32")
    for a, b in zip(streamed, planted["results"]):  # the feeds chunk differently (992 tokens, all at once)
        assert np.abs(a.max_corr - b.max_corr).max() <= 1e-5
        assert np.abs(a.baseline_max_corr - b.baseline_max_corr).max() <= 1e-5
        assert np.isfinite(a.max_corr_halves).all()
        assert np.abs(a.max_corr_halves - b.max_corr_halves).max() <= 1e-5
        assert np.abs(a.baseline_max_corr_halves - b.baseline_max_corr_halves).max() <= 1e-5
    excess = computer.compute_excess_correlations_for_all_neurons(planted["tokens"], n_rotations=3)
    assert list(excess.columns[:4]) == ["layer", "neuron", "excess_correlation", "n_models_compared"]
    assert len(excess) == N_LAYERS * D_MLP
