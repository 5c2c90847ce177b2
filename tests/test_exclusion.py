"""Token exclusion: positions holding excluded tokens (newlines, document separators) are
dropped from the token budget and from every activation row, and the correlations are those
of the kept positions. Checked against the Hugging Face models run directly."""
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import analyze_folders_a_and_b
from unlib.exclusion import exclusion_ids, kept_positions, parse_exclusion
from unlib.tokens import write_token_sequences
from unlib.zoo import train_tokenizer

N_TOKENS, CTX = 4200, 32


def documents(n: int = 800) -> list[str]:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "x", "y", "=", "+", "(", ")", ":"]
    return ["\n".join(" ".join(rng.choice(words, size=rng.integers(1, 6))) for _ in range(rng.integers(2, 8)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exclusion")
    texts = documents()
    tokenizer = train_tokenizer(texts, 300, 10**6, root / "tokenizer")
    config = GPT2Config(n_layer=2, n_embd=32, n_inner=48, n_head=4, n_positions=CTX, vocab_size=len(tokenizer))
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        GPT2LMHeadModel(config).save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
    store, _ = analyze_folders_a_and_b(root, texts, "--exclude-tokens", "bos,newline", "--n-tokens", str(N_TOKENS),
                                       "--threshold", "0.1")
    with h5py.File(next(store.glob("tokens/*/*.h5")), "r") as f:
        tokens, keep = f["tokens"][:], f["keep"][:]
    results = next(store.glob("results/*/final*"))
    return {"root": root, "store": store, "tokens": tokens, "keep": keep, "tokenizer": tokenizer,
            "results": results, "pairwise": pd.read_csv(results / "pairwise_correlations.csv")}


def direct_activations(model_dir: Path, tokens: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """MLP post-activations of the Hugging Face model at the kept positions, all layers side
    by side, from forward hooks on each MLP's own activation module."""
    model = GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    captured = {}
    hooks = [block.mlp.act.register_forward_hook(lambda mod, inp, out, l=l: captured.__setitem__(l, out))
             for l, block in enumerate(model.transformer.h)]
    with torch.no_grad():
        model(torch.from_numpy(tokens.astype(np.int64)))
    for hook in hooks:
        hook.remove()
    mask = torch.from_numpy(keep)
    return np.concatenate([captured[l][mask].double().numpy() for l in sorted(captured)], axis=1)


def test_no_kept_position_holds_an_excluded_token(run):
    tokens, keep, tokenizer = run["tokens"], run["keep"], run["tokenizer"]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and (tokens == newline[0]).sum() > 100, "the dataset must plant many newlines"
    assert (tokens[:, 1:] == tokenizer.bos_token_id).sum() > 10, "and document separators"
    assert keep.sum() == N_TOKENS, "the token budget counts kept positions"
    assert not keep[:, 0].any()
    assert not np.isin(tokens[keep], [newline[0], tokenizer.bos_token_id]).any()
    record = json.loads((run["results"] / "run.json").read_text())
    assert record["exclude_ids"] == sorted([newline[0], tokenizer.bos_token_id])
    positions = record["positions"]
    assert positions["analysed_tokens"] == N_TOKENS
    assert positions["dropped_excluded"] == int(np.isin(tokens[:, 1:], record["exclude_ids"]).sum())
    assert positions["positions"] == tokens.size == N_TOKENS + positions["dropped_bos_column"] \
        + positions["dropped_excluded"] + positions["dropped_past_budget"]


def test_cached_rows_are_the_kept_positions(run):
    for name in "ab":
        expected = direct_activations(run["root"] / name, run["tokens"], run["keep"])
        cache = next(run["store"].glob(f"activations/{name}-*/final/*.h5"))
        with h5py.File(cache, "r") as f:
            cached = np.concatenate([f[k][:].astype(np.float64) for k in sorted(f) if "." not in k], axis=1)
        assert cached.shape == expected.shape == (N_TOKENS, 2 * 48)
        # float32 noise (TransformerLens and the direct run sum in different orders)
        assert np.all(np.abs(cached - expected) <= np.abs(expected) * 1e-5 + 1e-6)


def test_correlations_are_numpys_on_the_kept_rows(run):
    a, b = (direct_activations(run["root"] / n, run["tokens"], run["keep"]) for n in "ab")
    corr = np.corrcoef(a.T, b.T)[: a.shape[1], a.shape[1]:]
    corr = np.nan_to_num(corr)  # a constant neuron's correlations are 0
    pairwise = run["pairwise"].sort_values(["layer", "neuron"])
    np.testing.assert_allclose(pairwise["max_corr"].to_numpy(), corr.max(axis=1), atol=1e-4)


def test_exclusion_items_resolve(tmp_path):
    tokenizer = train_tokenizer(documents(50), 300, 10**6, tmp_path / "tok")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    assert exclusion_ids("bos,newline", tokenizer) == sorted({tokenizer.bos_token_id, newline})
    assert exclusion_ids("\\n,7", tokenizer) == sorted({newline, 7})
    assert exclusion_ids("pad", tokenizer) == [tokenizer.pad_token_id]
    tokenizer.pad_token = None
    assert exclusion_ids("pad", tokenizer) == []  # no pad token: nothing to drop
    assert parse_exclusion("none") == []
    with pytest.raises(ValueError, match="not one"):
        exclusion_ids("alpha beta gamma", tokenizer)


def test_budget_is_exact_and_surplus_is_trimmed(tmp_path):
    tokenizer = train_tokenizer(documents(50), 300, 10**6, tmp_path / "tok")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    counts = write_token_sequences(tmp_path / "t.h5", documents(), tokenizer, tokenizer.bos_token_id, 777, 16,
                                   [newline, tokenizer.bos_token_id], {})
    with h5py.File(tmp_path / "t.h5", "r") as f:
        tokens, keep = f["tokens"][:], f["keep"][:]
    assert keep.sum() == 777 and counts["analysed_tokens"] == 777
    untrimmed = kept_positions(tokens, [newline, tokenizer.bos_token_id])
    assert untrimmed[:-1].sum() < 777 <= untrimmed.sum(), "no more sequences than the budget needs"
    assert np.array_equal(keep[:-1], untrimmed[:-1])
