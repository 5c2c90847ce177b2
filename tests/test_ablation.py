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
from unlib.ablation import (SUMMARY_COLUMNS, TABLE_COLUMNS, ablate, ablation_metrics, ablation_sets, ablation_summary,
                            ablation_table, frequency_deciles, layer_counts, mean_activations,
                            random_sets)
from unlib.exclusion import kept_positions
from unlib.model_loading import load_model
from unlib.model_sets import ModelSpec

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
    assert sorted({scope for scope, _ in conditions}) == ["all", "layer 0", "layer 2", "layer 3"] + sorted(
        f"neuron {l}:{n}" for l, n in universal)
    assert conditions[("neuron 2:8", "universal")] == [(2, 8)]
    assert conditions[("layer 2", "universal")] == [(2, 7), (2, 8), (2, 9)]
    assert conditions[("layer 2", "random-1")] == [p for p in sets[1] if p[0] == 2]
    assert conditions[("all", "random-3")] == sets[3]
    assert ablation_sets([], 16, 4, seed=11) == {}


def test_matched_random_sets_pair_each_neuron_within_its_frequency_decile():
    """Planted frequencies: layer 0's neurons 0-39 in ascending frequency (deciles of 4), the
    last 8 dead; each universal neuron's partner comes from its decile, or the nearest one
    with a neuron left, and no dead neuron is ever drawn."""
    frequency = np.tile(np.linspace(0.01, 0.9, 48), (2, 1))
    live = np.ones((2, 48), dtype=bool)
    live[:, 40:] = False
    deciles = frequency_deciles(frequency, live)
    assert list(deciles[0, :40]) == [n // 4 for n in range(40)] and (deciles[:, 40:] == -1).all()
    # two universal neurons in decile 9 (neurons 36-39: two others left), three in decile 0
    # (neurons 0-3: one left, so two partners come from decile 1), one in layer 1
    universal = [(0, 36), (0, 37), (0, 0), (0, 1), (0, 2), (1, 20)]
    sets = random_sets(universal, 48, 200, seed=3, deciles=deciles)
    for drawn in sets:
        assert layer_counts(drawn) == {0: 5, 1: 1} and not set(drawn) & set(universal)
        assert all(n < 40 for _, n in drawn), "a dead neuron was drawn"
        layer0 = sorted(deciles[0, n] for l, n in drawn if l == 0)
        assert layer0 == [0, 1, 1, 9, 9]
        assert [deciles[1, n] for l, n in drawn if l == 1] == [5]
    assert len({tuple(s) for s in sets}) == 6 * 3  # every pairing the strata allow: 2 of decile 1, 1 of 3 in layer 1
    assert random_sets(universal, 48, 5, seed=3, deciles=deciles) == sets[:5]


def test_nothing_to_ablate_is_said_not_failed(tmp_path):
    """An empty universal set has no sets to ablate (the pipeline runs no pass over the held-out
    tokens); the tables are empty and the report says there is nothing to ablate; without an
    ablation (TOP_K) it says why."""
    from unlib import plots
    from unlib.html_report import ablation_html

    assert ablation_sets([], 64, 20, 0) == {}
    table = ablation_table({}, {})
    assert list(table.columns) == TABLE_COLUMNS and table.empty
    summary = ablation_summary(table)
    assert summary.empty and list(summary.columns) == SUMMARY_COLUMNS
    plots.ablation_impact_plot(table, summary, tmp_path / "empty.png")
    run = {"ablation": "mean", "ablation_tokens": 100, "ablation_seed": 0}
    html = ablation_html(run, {"table": table, "summary": summary, "plot": tmp_path / "empty.png"})
    assert 'id="ablation-empty"' in html and "nothing to ablate" in html
    assert 'id="ablation-not-run"' in ablation_html(run, None)


def test_top_k_runs_no_ablation():
    """TOP_K picks neurons by rank, not a universal set: the report and the comparison do not
    ask for the ablation (their pages say so, ablation_html above)."""
    from tasks.ablation import Ablation
    from tasks.report import CompareCheckpoints, RunReport

    task = RunReport(models="toy-zoo-mini", checkpoint=300, top_k=5, dataset="python-stdlib", ctx_len=64,
                     exclude_tokens="bos", device="cpu", corr_memory="1G", parallel=1)
    assert "ablation" not in task.requires() and isinstance(task.clone(top_k=None).requires()["ablation"], Ablation)
    compare = task.clone(CompareCheckpoints, checkpoints=[100, 300])
    assert "ablation" not in compare.requires() and "ablation_by_checkpoint.csv" not in compare.output()
    assert set(compare.clone(top_k=None).requires()["ablation"]) == {100, 300}


MODELS, STEP, N_TOKENS = "toy-zoo-mini", 300, 8192


@pytest.fixture(scope="module")
def run(tmp_path_factory, mini_zoo):
    """`python -m tasks analyze` on the mini zoo with the default ablation."""
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(mini_zoo, store / "zoo")
    proc = subprocess.run([sys.executable, "-m", "tasks", "analyze", "--models", MODELS, "--checkpoint", str(STEP),
                           "--n-tokens", str(N_TOKENS), "--device", "cpu", "--scheduler", "local"], cwd=REPO,
                          env={**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)  # the terminal summary, ablation table included (pytest -s shows it)
    d = store / "results" / MODELS / f"checkpoint-{STEP}_n_tokens-{N_TOKENS}"
    return {"store": store, "dir": d, "stdout": proc.stdout, "table": pd.read_csv(d / "ablation.csv"),
            "summary": pd.read_csv(d / "ablation_summary.csv"), "universal": pd.read_csv(d / "universal_neurons.csv"),
            "stats": pd.read_csv(d / "neuron_stats.csv")}


def test_held_out_tokens_come_from_other_documents_each_cut_short(run):
    """The ablation's tokens, derived again from the documents one by one: the analysed file is
    the documents in their order, joined by the separator; the held-out file continues after
    the last document the analysed one touches, each document cut to a sequence or a 50th of
    the held-out tokens, and it records how many documents it draws on (at least 20 here)."""
    import h5py
    from unlib.dataset import load_texts
    from unlib.model_loading import load_tokenizer
    from unlib.model_sets import ZOOS, resolve_model_set
    from unlib.tokens import read_tokens

    (analysed,) = run["store"].glob("tokens/*/*.h5")
    (held_out,) = run["store"].glob("tokens/*/held-out/*.h5")
    tokens, _ = read_tokens(analysed)
    held, held_keep = read_tokens(held_out)
    assert int(held_keep.sum()) == N_TOKENS // 5 and held_out.name.endswith(f"_skip{N_TOKENS}.h5")
    tokenizer = load_tokenizer(resolve_model_set(MODELS, run["store"]), run["store"])
    sep, ctx_len = tokenizer.bos_token_id, ZOOS[MODELS].ctx_len
    docs = []
    for text in load_texts("python-stdlib"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if ids:  # an empty document adds nothing, not even a separator
            docs.append(ids + [sep])
        if len(docs) > 2000:
            break
    stream = np.concatenate(docs)
    flat = tokens[:, 1:].ravel()
    assert np.array_equal(flat, stream[:len(flat)])
    ends = np.cumsum([len(d) for d in docs])
    first = int(np.searchsorted(ends, len(flat))) + 1  # after the last document the analysed rows touch
    cap = max(ctx_len - 2, -(-(N_TOKENS // 5) // 50))  # a sequence, or a 50th of the held-out tokens
    cut = np.concatenate([d[:-1][:cap] + [sep] for d in docs[first:]])
    flat_held = held[:, 1:].ravel()
    assert np.array_equal(flat_held, cut[:len(flat_held)])
    n_docs = int(np.searchsorted(np.cumsum([min(len(d), cap + 1) for d in docs[first:]]), len(flat_held))) + 1
    with h5py.File(held_out) as f:
        assert int(f.attrs["n_documents"]) == n_docs >= 20


def test_ablation_csv_equals_the_edited_hugging_face_model(run):
    """The table's shape and invariants, its loss for the universal set against the Hugging
    Face model with that set's mean ablation written into its weights, on the held-out tokens,
    and the means (neuron_stats.csv's post_mean) against the activation cache."""
    import h5py
    from transformers import GPT2LMHeadModel
    from unlib.tokens import read_tokens

    table, universal, stats = run["table"], run["universal"], run["stats"]
    assert list(table.columns) == TABLE_COLUMNS
    layers = sorted(universal["layer"].unique())
    assert list(dict.fromkeys(table["scope"])) == ["all"] + [f"layer {l}" for l in layers]
    for scope, group in table.groupby("scope"):
        assert list(group["condition"]) == ["none", "universal"] + [f"random-{k}" for k in range(99)]
        count = len(universal) if scope == "all" else int((universal["layer"] == int(scope.split()[1])).sum())
        assert (group["n_neurons"].iloc[1:] == count).all() and group["n_neurons"].iloc[0] == 0
    np.testing.assert_allclose(table["delta_loss"], table["loss"] - table["loss"].iloc[0], atol=2e-5)
    assert (table["kl"] >= 0).all() and table["top1_agreement"].between(0, 1).all()
    none = table[table["condition"] == "none"]
    assert (none["delta_loss"] == 0).all() and (none["kl"] == 0).all() and (none["top1_agreement"] == 1).all()
    # the means: neuron_stats.csv's post_mean is the mean of the cached hook_post activations
    (cache,) = run["store"].glob(f"activations/*seed-0/checkpoint-{STEP}/*.h5")
    with h5py.File(cache, "r") as f:
        for layer in range(2):
            np.testing.assert_allclose(stats.loc[stats.layer == layer, "post_mean"],
                                       f[f"layer_{layer:03d}"][:].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    means = torch.tensor(stats.sort_values(["layer", "neuron"])["post_mean"].to_numpy().reshape(2, -1))
    tokens, keep = read_tokens(next(run["store"].glob("tokens/*/held-out/*.h5")))
    model_dir = next(run["store"].glob(f"zoo/{MODELS}-*/seed-0/checkpoint-{STEP}"))
    original = GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    assert none["loss"].iloc[0] == pytest.approx(hf_loss(original, tokens, keep), abs=2e-5)
    for scope in ("all", f"layer {layers[0]}"):
        chosen = [(l, n) for l, n in zip(universal["layer"], universal["neuron"])
                  if scope == "all" or f"layer {l}" == scope]
        expected = hf_loss(edited_model(model_dir, chosen, means), tokens, keep)
        row = table[(table["scope"] == scope) & (table["condition"] == "universal")].iloc[0]
        assert row["loss"] == pytest.approx(expected, abs=2e-5), scope


def test_summary_on_a_planted_table():
    """Hand-made numbers: 3 of 20 random sets at least as harmful as the universal set by the
    loss (one of them tied), none by the KL."""
    deltas = [0.01 * k for k in range(17)] + [0.5, 0.6, 0.7]  # the universal set: 0.5
    rows = [{"scope": "all", "condition": "none", "n_neurons": 0, "loss": 2.0, "delta_loss": 0.0, "kl": 0.0,
             "top1_agreement": 1.0},
            {"scope": "all", "condition": "universal", "n_neurons": 4, "loss": 2.5, "delta_loss": 0.5, "kl": 0.9,
             "top1_agreement": 0.5}]
    rows += [{"scope": "all", "condition": f"random-{k}", "n_neurons": 4, "loss": 2.0 + d, "delta_loss": d,
              "kl": 0.125, "top1_agreement": 0.9} for k, d in enumerate(deltas)]
    (row,) = ablation_summary(pd.DataFrame(rows)).itertuples(index=False)
    assert row.n_random == 20 and row.n_neurons == 4
    assert row.delta_loss_p == pytest.approx(4 / 21)  # (1 + 3) / (1 + 20)
    assert row.kl_p == pytest.approx(1 / 21)  # never 0: the smallest p 20 sets can give
    assert row.random_delta_loss_mean == pytest.approx(3.16 / 20)
    assert row.random_kl_std == 0 and np.isnan(row.kl_z)


def test_summary_p_values_are_permutation_p_values(run):
    summary = run["summary"]
    assert list(summary.columns) == SUMMARY_COLUMNS and list(summary["scope"]) == list(dict.fromkeys(run["table"]["scope"]))
    for column in ("delta_loss_p", "kl_p"):
        counts = summary[column] * (1 + summary["n_random"])  # 1 + k, an integer from 1 to 1 + n
        assert np.allclose(counts, counts.round()) and (counts >= 1).all(), column
        assert (counts <= 1 + summary["n_random"]).all() and (summary["n_random"] == 99).all(), column


def test_report_section_shows_the_csv_numbers(run):
    from PIL import Image
    from test_reports import text_of

    html = (run["dir"] / "report.html").read_text()
    summary, table = run["summary"], run["table"]
    overall = summary[summary["scope"] == "all"].iloc[0]
    assert int(text_of(html, "ablation-n-neurons")) == overall["n_neurons"] == len(run["universal"])
    assert int(text_of(html, "ablation-tokens")) == N_TOKENS // 5
    assert float(text_of(html, "ablation-loss")) == pytest.approx(table["loss"].iloc[0], rel=1e-3)
    for element, column in [("universal-delta-loss", "universal_delta_loss"), ("universal-kl", "universal_kl"),
                            ("random-delta-loss-mean", "random_delta_loss_mean"),
                            ("random-delta-loss-q05", "random_delta_loss_q05"),
                            ("random-delta-loss-q95", "random_delta_loss_q95"), ("random-kl-mean", "random_kl_mean"),
                            ("random-kl-q05", "random_kl_q05"), ("random-kl-q95", "random_kl_q95")]:
        assert float(text_of(html, f"ablation-{element}")) == pytest.approx(overall[column], rel=1e-3), element
    # the summary table: a row per scope and measure
    shown = {}
    for scope, body in re.findall(r'<tr data-scope="([^"]*)">(.*?)</tr>', html):
        cells = dict(re.findall(r'<td data-col="([^"]*)">([^<]*)</td>', body))
        shown[(scope, cells["measure"])] = cells
    assert set(shown) == {(s, m) for s in summary["scope"] for m in ("Δloss", "KL")}
    for row in summary.itertuples(index=False):
        for metric, measure in (("delta_loss", "Δloss"), ("kl", "KL")):
            cells = shown[(row.scope, measure)]
            for shown_as, column in (("universal", f"universal_{metric}"), ("random_mean", f"random_{metric}_mean"),
                                     ("p", f"{metric}_p")):
                assert float(cells[shown_as]) == pytest.approx(getattr(row, column), rel=1e-3, abs=1e-9)
    sentence = re.sub(r"<[^>]+>", "", re.search(r'id="ablation-sentence">(.*?)</p>', html).group(1))
    assert "more harmful" in sentence and "held-out tokens" in sentence
    image = np.asarray(Image.open(run["dir"] / "plots" / "ablation_impact.png").convert("L"), dtype=float)
    assert image.shape[0] > 200 and image.std() > 10
    title = "Ablation: universal neurons against random sets matched on layer and activation frequency"
    assert "".join(title.split()) in "".join(run["stdout"].split())  # rich wraps a pipe's lines
