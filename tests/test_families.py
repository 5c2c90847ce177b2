"""Neuron families against planted ground truth: variance reduction of a planted feature, a
previous-token neuron (sequence starts included), a unigram neuron and an attention-deactivation
neuron built into a GPT-2 with `transformers`, and prediction, suppression, partition and
entropy neurons from constructed unembeddings."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from unlib.explain import FeatureMatrix, VarianceReduction, positional_mi
from unlib.features import TokenFeatures, Variable, token_features
from unlib.roles import (ENTROPY_NULL_FRACTION, PARTITION_VAR, PREDICTION_KURT, effective_null_space, null_fraction,
                         random_vocab_var, role_of, vocab_moments)

BYTES = ["<|endoftext|>"] + [chr(i) for i in range(32, 127)] + ["\n"]  # the BOS, printable ASCII and newline


def exact_vr(a: np.ndarray, f: np.ndarray) -> float:
    """VR by its definition, in float64: [Var(a) - (n0/n) Var(a|f=0) - (n1/n) Var(a|f=1)] / Var(a)."""
    n, n1 = len(a), int(f.sum())
    return (a.var() - (n - n1) / n * a[~f].var() - n1 / n * a[f].var()) / a.var()


def one_feature(f: np.ndarray) -> FeatureMatrix:
    return FeatureMatrix(TokenFeatures([Variable("token", ["f"], np.where(f, 0, -1))],
                                       np.ones(len(f), dtype=np.int64), 0, 0))


def test_variance_reduction_of_a_planted_feature_is_pq_delta_squared_over_the_variance():
    rng = np.random.default_rng(0)
    n, p, delta, sigma = 400_000, 0.3, 2.0, 1.5
    f = rng.random(n) < p
    a = (delta * f + sigma * rng.standard_normal(n)).astype(np.float32)
    acc = VarianceReduction(one_feature(f), 1)
    for start in range(0, n, 30_000):  # in chunks, as from a cache
        acc.add(a[start:start + 30_000, None])
    vr, _, _ = acc.result()
    expected = p * (1 - p) * delta ** 2 / (p * (1 - p) * delta ** 2 + sigma ** 2)
    assert vr[0, 0] == pytest.approx(exact_vr(a.astype(np.float64), f), abs=1e-9)
    assert vr[0, 0] == pytest.approx(expected, abs=0.005)


def test_a_previous_byte_neuron_scores_on_the_previous_token_not_the_current_one():
    rng = np.random.default_rng(1)
    n_seq, ctx = 600, 32
    tokens = rng.integers(1, len(BYTES), size=(n_seq, ctx))
    tokens[:, 0] = 0  # BOS-led rows, no separators inside
    keep = np.ones(tokens.shape, dtype=bool)
    keep[:, 0] = False
    x = BYTES.index("e")
    # many rows end with the byte: np.roll across rows would see it before the next row's first token
    tokens[::2, -1] = x
    previous = np.zeros(tokens.shape, dtype=bool)
    previous[:, 1:] = tokens[:, :-1] == x
    a = (3.0 * previous + 0.1 * rng.standard_normal(tokens.shape))[keep]
    features = FeatureMatrix(token_features(tokens, keep, BYTES))
    acc = VarianceReduction(features, 1)
    acc.add(a[:, None])
    vr = acc.result()[0][:, 0]
    vr_of = dict(zip(features.names, vr))
    assert features.names[int(vr.argmax())] == "prev 'e'"
    assert vr_of["prev 'e'"] == pytest.approx(exact_vr(a, previous[keep]), abs=1e-9)
    assert vr_of["prev 'e'"] > 0.8 and vr_of["'e'"] < 0.01
    # the first analysed position's previous token is its own row's BOS, never the row before's last
    column = features.matrix(0, features.n)[:, features.names.index("prev 'e'")].toarray().ravel()
    first = column.reshape(n_seq, ctx - 1)[:, 0]
    assert not first.any()


def test_positional_mutual_information_of_a_neuron_firing_only_early():
    per_position = np.full(64, 1000)
    fired = np.zeros((64, 2))
    fired[:8, 0] = 1000  # fires at positions 0-7 only: I = H(1/8) in nats
    fired[:, 1] = 500  # fires half the time everywhere: no information
    p = 1 / 8
    assert positional_mi(fired, per_position) == pytest.approx([-(p * np.log(p) + (1 - p) * np.log(1 - p)), 0],
                                                               abs=1e-12)


def unembedding(assign: dict[int, torch.Tensor], vocab: int = 257, d: int = 16, seed: int = 0) -> torch.Tensor:
    """W_U (d, vocab) whose columns are random directions orthogonal to e_0, except those given."""
    g = torch.Generator().manual_seed(seed)
    w_u = torch.randn(d, vocab, generator=g, dtype=torch.float64)
    w_u[0] = 0
    for v, column in assign.items():
        w_u[:, v] = column
    return w_u


def test_prediction_suppression_and_partition_neurons_from_their_vocabulary_composition():
    e0 = torch.zeros(16, dtype=torch.float64)
    e0[0] = 1
    promoted = unembedding({v: e0 for v in range(10)})
    half = unembedding({v: e0 if v % 2 else -e0 for v in range(257)})
    w_out = torch.stack([e0, -e0])[None]  # layer 0: neuron 0 writes e_0, neuron 1 writes -e_0
    _, var, skew, kurt = vocab_moments(w_out, promoted)
    p = 10 / 257  # a 10-token indicator over 257 tokens: raw kurtosis 23.7, skew 4.77
    assert kurt[0, 0].item() == pytest.approx((1 - 3 * p * (1 - p)) / (p * (1 - p)), rel=1e-9)
    assert kurt[0, 0].item() == pytest.approx(23.7, abs=0.1) and skew[0, 0].item() == pytest.approx(4.77, abs=0.01)
    assert skew[0, 1].item() == pytest.approx(-skew[0, 0].item())
    _, half_var, _, half_kurt = vocab_moments(w_out, half)
    evidence = pd.DataFrame({"vocab_kurt": [kurt[0, 0].item(), kurt[0, 1].item(), half_kurt[0, 0].item()],
                             "vocab_skew": [skew[0, 0].item(), skew[0, 1].item(), 0.0],
                             "vocab_var": [var[0, 0].item(), var[0, 1].item(), half_var[0, 0].item()],
                             "null_fraction": 0.0, "deactivation_z": np.nan})
    assert half_kurt[0, 0].item() == pytest.approx(1.0, abs=1e-3) and half_kurt[0, 0].item() < PREDICTION_KURT
    assert half_var[0, 0].item() > PARTITION_VAR * random_vocab_var(half)
    assert list(role_of(evidence, PARTITION_VAR * random_vocab_var(half), 4.0)) == ["prediction", "suppression",
                                                                                    "partition"]


def test_a_neuron_writing_into_the_unembeddings_null_space_is_an_entropy_neuron_with_no_logit_effect():
    g = torch.Generator().manual_seed(2)
    d, k = 16, 4
    w_u = torch.randn(d, 257, generator=g, dtype=torch.float64)
    w_u[d - k:] *= 1e-4  # the last k directions are almost never read by any token
    w_out = torch.randn(1, 3, d, generator=g, dtype=torch.float64)
    w_out[0, 0, :d - k] = 0  # neuron 0 writes only there, the others mostly elsewhere
    w_out[0, 1:, d - k:] *= 0.2
    basis, record = effective_null_space(w_u, w_out)
    assert record["k"] == k
    fraction = null_fraction(w_out[0], basis)
    assert fraction[0].item() == pytest.approx(1.0, abs=1e-9) and fraction[0].item() >= ENTROPY_NULL_FRACTION
    assert fraction[1:].max().item() < ENTROPY_NULL_FRACTION
    logits = w_out[0] @ w_u
    assert logits[0].abs().max().item() < 1e-3 * logits[1:].abs().max().item()


UNIGRAM_NEURON, DEACTIVATION_NEURON, HEAD = 5, 7, (1, 2)


@pytest.fixture(scope="module")
def built_gpt2(tmp_path_factory):
    """A random GPT-2 (transformers) with two planted layer-0 neurons: UNIGRAM_NEURON reads the
    centred embedding of "=" (weak positions and attention, so the MLP sees the token), and
    DEACTIVATION_NEURON writes W_Q k_BOS of HEAD; with byte tokens of held-out Python text."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from unlib.dataset import offline_corpus
    from unlib.mlp_hooks import processed_weights
    from unlib.model_loading import load_model
    from unlib.model_sets import ModelSpec
    from unlib.roles import bos_keys
    from unlib.tokens import token_sequences
    from unlib.zoo import train_tokenizer

    root = tmp_path_factory.mktemp("families")
    tokenizer = train_tokenizer(offline_corpus("train")["text"][:20], 257, 10**5, root / "tokenizer")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=64, vocab_size=257,
                                       bos_token_id=0, eos_token_id=0))
    token = tokenizer("=", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(0.01)
        for block in model.transformer.h:
            block.attn.c_proj.weight.mul_(0.01)
            block.attn.c_proj.bias.zero_()
        model.transformer.h[1].attn.c_attn.weight[:, :64] *= 30  # sharp attention in layer 1: queries and keys
        embedding = model.transformer.wte.weight[token]
        centred = (embedding - embedding.mean()) / (embedding - embedding.mean()).norm()
        mlp = model.transformer.h[0].mlp
        mlp.c_fc.weight[:, UNIGRAM_NEURON] = 4 / 32 ** 0.5 * centred  # 4 on "=", about -2 +- 0.7 elsewhere
        mlp.c_fc.bias[UNIGRAM_NEURON] = -2.0
    spec = ModelSpec("planted", str(root / "model"))
    model.save_pretrained(spec.source)
    tokenizer.save_pretrained(spec.source)
    bridge = load_model(spec, None)
    layer, head = HEAD
    direction = processed_weights(bridge)["W_Q"][layer, head] @ bos_keys(bridge, 0)[layer, head]
    with torch.no_grad():
        mlp.c_proj.weight[DEACTIVATION_NEURON] = 2 * direction.float() / direction.norm()
    model.save_pretrained(spec.source)
    texts = offline_corpus("heldout")["text"]
    tokens, keep, _ = token_sequences(texts, tokenizer, 0, 20_000, 64, [0])
    return load_model(spec, None), tokenizer, tokens, keep, token, spec.source


def test_planted_unigram_and_attention_deactivation_neurons_are_found_in_a_gpt2(built_gpt2):
    from unlib.families import explain_neurons
    from unlib.stats import NeuronStatsGenerator

    model, tokenizer, tokens, keep, token, _ = built_gpt2
    stats = NeuronStatsGenerator(model).compute(tokens, keep)
    explained = explain_neurons(model, tokenizer, tokens, keep, stats)
    unigram = explained.families.set_index(["layer", "neuron"]).loc[(0, UNIGRAM_NEURON)]
    assert unigram["input_family"] == "unigram" and unigram["best_feature"] == repr(tokenizer.decode([token]))
    assert unigram["best_vr"] > 0.5
    roles = explained.roles[explained.roles["layer"] == 0].set_index("neuron")
    planted = roles.loc[DEACTIVATION_NEURON]
    assert (planted["deactivation_layer"], planted["deactivation_head"]) == HEAD
    assert planted["role"] == "attention deactivation"
    assert planted["deactivation_z"] > explained.record["deactivation_z"]
    assert roles["deactivation_z"].idxmax() == DEACTIVATION_NEURON
    assert (roles["role"] == "attention deactivation").sum() <= 3  # the rest: random, at the Gaussian baseline
    # the last layer has no later head
    assert (explained.roles.loc[explained.roles["layer"] == 1, "deactivation_head"] == -1).all()


def test_the_planted_deactivation_neuron_turns_its_head_to_bos_when_fixed_higher(built_gpt2):
    from unlib.interventions import activation_sweep, head_column

    model, tokenizer, tokens, keep, _, _ = built_gpt2
    tokens, keep = tokens[:8], keep[:8]
    sweep = activation_sweep(model, tokens, keep, [(0, DEACTIVATION_NEURON)], [HEAD], queries_only=True)
    attention = sweep[sweep["layer"] == 0][head_column(*HEAD)].to_numpy()
    assert (np.diff(attention) > 0).all() and attention[-1] > 2 * attention[1]


def test_a_neuron_writing_into_the_null_space_raises_the_entropy_with_no_direct_logit_effect(built_gpt2, tmp_path):
    """A GPT-2 whose token embeddings (tied to the unembedding) leave the last 4 residual
    dimensions empty: a last-layer neuron writing e_31 - e_30 has null fraction 1 and no direct
    logit effect, and fixing it higher raises the final LayerNorm's scale and the entropy."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from unlib.interventions import activation_sweep
    from unlib.mlp_hooks import processed_weights
    from unlib.model_loading import load_model
    from unlib.model_sets import ModelSpec
    from unlib.roles import WeightRoles
    from unlib.stats import NeuronStatsGenerator

    _, tokenizer, tokens, keep, _, _ = built_gpt2
    tokens, keep = tokens[:16], keep[:16]
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=64, vocab_size=257,
                                       bos_token_id=0, eos_token_id=0))
    neuron = 9
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20)  # confident predictions: entropy has room to rise
        model.transformer.wte.weight[:, 28:] = 0
        direction = torch.zeros(32)
        direction[31], direction[30] = 1.0, -1.0
        model.transformer.h[1].mlp.c_proj.weight[neuron] = direction
    spec = ModelSpec("null-space", str(tmp_path / "model"))
    model.save_pretrained(spec.source)
    tokenizer.save_pretrained(spec.source)
    bridge = load_model(spec, None)
    stats = NeuronStatsGenerator(bridge).compute(tokens, keep)
    weights = WeightRoles(bridge, stats, 0)
    roles = weights.table().set_index(["layer", "neuron"])
    assert weights.null_space["k"] >= 1
    assert roles.loc[(1, neuron), "null_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert roles.loc[(1, neuron), "role"] == "entropy"
    processed = processed_weights(bridge)
    logits = processed["W_out"][1, neuron] @ processed["W_U"]
    assert logits.abs().max().item() < 1e-6 * processed["W_out"][1, neuron].norm().item()
    sweep = activation_sweep(bridge, tokens, keep, [(1, neuron)], [])
    fixed = sweep[sweep["layer"] == 1]
    assert (np.diff(fixed["entropy"].to_numpy()[1:]) > 0).all() and (np.diff(fixed["ln_scale"].to_numpy()[1:]) > 0).all()
    assert fixed["entropy"].iloc[-1] > fixed["entropy"].iloc[1] + 0.5


def test_a_sweep_equals_the_hugging_face_model_with_the_neuron_fixed(built_gpt2):
    """One sweep condition against transformers' own GPT-2 with a forward hook fixing the GELU
    output of that neuron, loss, entropy and final LayerNorm scale in numpy float64."""
    from transformers import GPT2LMHeadModel

    from unlib.interventions import activation_sweep

    model, _, tokens, keep, _, folder = built_gpt2
    tokens, keep = tokens[:6], keep[:6]
    layer, neuron, value = 0, DEACTIVATION_NEURON, 6.0
    sweep = activation_sweep(model, tokens, keep, [(layer, neuron)], [], values=(value,))
    row = sweep[sweep["layer"] == layer].iloc[0]
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()

    def fix(module, args, out):
        out = out.clone()
        out[..., neuron] = value
        return out

    scales = []
    hf.transformer.h[layer].mlp.act.register_forward_hook(fix)
    hf.transformer.ln_f.register_forward_hook(
        lambda module, args, out: scales.append(np.sqrt(args[0].double().var(-1, unbiased=False).numpy()
                                                        + module.eps)))
    with torch.no_grad():
        logits = hf(torch.from_numpy(tokens.astype(np.int64))).logits.double().numpy()
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets = tokens[:, 1:]
    loss = -np.take_along_axis(log_probs[:, :-1], targets[..., None], -1)[..., 0][keep[:, 1:]].mean()
    entropy = -(np.exp(log_probs) * log_probs).sum(-1)[keep].mean()
    expected = {"loss": loss, "entropy": entropy, "ln_scale": scales[0][keep].mean()}
    unchanged = sweep.iloc[0]
    for column, value in expected.items():  # float32 against float64: within 1e-5
        assert row[column] == pytest.approx(value, rel=1e-5)
        # and the fix moves each by more than twice that: a missed hook would fail the test
        assert abs(row[column] - unchanged[column]) > 2e-5 * abs(value)


def test_sentencepiece_tokens_keep_the_space_that_starts_a_word():
    """Llama-style tokenizers (Metaspace) drop the leading space of a text's first token when one
    token is decoded alone; the pieces keep it, so rejoined documents keep their words apart."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from unlib.features import token_pieces

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    text = "the cat sat on the mat and the dog sat on the log"
    tok.train_from_iterator([text] * 20, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    pieces = token_pieces(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(pieces[i] for i in ids).strip() == text
    assert tokenizer.decode([ids[1]]) == tokenizer.decode([ids[1]]).lstrip()  # decoded alone: no space
    assert pieces[ids[1]].startswith(" ")  # "▁cat" (or its first part) begins a word


def test_prose_is_not_python_and_tab_indented_code_starts_its_lines_once():
    from unlib.features import _document_features

    prose = "It's a $5 book, isn't it? Yes."
    pieces = [chr(i) for i in range(128)]
    assert not _document_features(pieces, np.array([ord(c) for c in prose]))["python_complete"]
    code = "if x:\n\ty = 1\n"
    found = _document_features(pieces, np.array([ord(c) for c in code]))
    assert found["python_complete"]
    starts = [code[i] for i in np.flatnonzero(found["start of line"])]
    assert starts == ["i", "y"]  # not the " ", "=" or "1" after the tab
    assert found["indent"][code.index("y")] == 1  # one tab: 4 columns
