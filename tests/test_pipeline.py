"""End to end through Luigi and the command line, on the small toy zoo (trained once per
session by conftest's `mini_zoo`, through the pipeline's training tasks): runs every stage,
and checks the values in every output file against independent computations (numpy
float64, the Hugging Face model run directly)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from PIL import Image

from test_weight_stats import TOLERANCE, WEIGHT_COLUMNS, reference_weight_stats
from unlib.engine.halves import HalfSplit
from unlib.engine.precision import default_precision
from unlib.engine.rotations import haar_orthogonal
from unlib.engine.tables import EXCESS_COLUMNS, PAIRWISE_COLUMNS, SPLIT_HALF_COLUMNS
from unlib.stats import STATS_COLUMNS

from conftest import REPO, cli_in_process
MODELS = "toy-zoo-mini"
N_TOKENS = 6000
THRESHOLD = 0.1
# the results folder: PRECISION=fp32 (see analyze) names it where the CPU's default differs
BASE = f"checkpoint-300_n_tokens-{N_TOKENS}" + ("" if default_precision("cpu") == "fp32" else "_precision-fp32")


def analyze(store: Path, *args: str) -> subprocess.CompletedProcess:
    """The pipeline with fp32 products, so that its numbers are float64's to float32 rounding
    (each PRECISION's own rounding: test_precision.py)."""
    env = {**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tasks", "analyze", "--scheduler", "local", "--precision", "fp32",
                           *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory, mini_zoo):
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(mini_zoo, store / "zoo")
    proc = analyze(store, "--models", MODELS, "--checkpoint", "300", "--n-tokens", str(N_TOKENS),
                   "--threshold", str(THRESHOLD), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = store / "results" / MODELS / BASE
    return {"store": store, "dir": results, "stdout": proc.stdout, "stderr": proc.stderr,
            "excess": pd.read_csv(results / "excess_correlation_scores.csv"),
            "pairwise": pd.read_csv(results / "pairwise_correlations.csv"),
            "stats": pd.read_csv(results / "neuron_stats.csv"),
            "universal": pd.read_csv(results / "universal_neurons.csv")}


def caches(store: Path) -> list[Path]:
    paths = sorted(store.glob("activations/*/checkpoint-300/*.h5"))
    assert len(paths) == 3
    return paths


def load_layers(path: Path) -> list[np.ndarray]:
    with h5py.File(path, "r") as f:
        return [f[name][:].astype(np.float64) for name in sorted(f) if "." not in name]


def test_summary_printed_whole_to_a_pipe(run):
    """stdout is a pipe here: rich would wrap at 80 columns, splitting paths and truncating
    the ablation table's cells and headers with an ellipsis."""
    out = run["stdout"]
    assert "Universal neurons" in out and f"Results: {run['dir']}\n" in out
    assert f"Report: {run['dir'] / 'report.html'}\n" in out
    header = next(line for line in out.split("Ablation:")[1].splitlines() if "scope" in line)
    assert "\u2026" not in out and "universal" in header and "random mean" in header
    # routine lines are plain lines on stderr, not warnings
    assert "\ncorrelation block " in "\n" + run["stderr"] and "WARNING: correlation block" not in run["stderr"]


def test_excess_scores_are_consistent(run):
    excess = run["excess"]
    assert list(excess.columns) == EXCESS_COLUMNS + SPLIT_HALF_COLUMNS + ["dead"]
    assert np.isfinite(excess[SPLIT_HALF_COLUMNS].values).all() and (excess["excess_se"] > 0).all()
    assert len(excess) == 2 * 64 and (excess["n_models_compared"] == 2).all()
    np.testing.assert_allclose(excess["excess_correlation"], excess["mean_corr"] - excess["mean_baseline"], atol=2e-5)
    assert (excess["min_corr"] <= excess["mean_corr"] + 1e-6).all() and (excess["mean_corr"] <= excess["max_corr"] + 1e-6).all()
    grouped = run["pairwise"].groupby(["layer", "neuron"])
    np.testing.assert_allclose(grouped["max_corr"].max().values, excess["max_corr"].values, atol=2e-5)
    np.testing.assert_allclose(grouped["baseline_max_corr"].mean().values, excess["mean_baseline"].values, atol=2e-5)


def test_pairwise_correlations_match_numpy_float64(run):
    pairwise = run["pairwise"]
    assert list(pairwise.columns) == PAIRWISE_COLUMNS
    assert set(pairwise["other_model"]) == {f"{MODELS}/seed-1", f"{MODELS}/seed-2"}
    ref, *others = [load_layers(p) for p in caches(run["store"])]
    for k, other in enumerate(others, start=1):
        y = np.concatenate(other, axis=1)
        for layer in range(2):
            x = ref[layer]
            corr = np.corrcoef(x.T, y.T)[:64, 64:]
            rows = pairwise[(pairwise.other_model == f"{MODELS}/seed-{k}") & (pairwise.layer == layer)]
            np.testing.assert_allclose(rows["max_corr"].values, corr.max(axis=1), atol=1e-4)
            flat = rows["max_layer"].values * 64 + rows["max_neuron"].values
            np.testing.assert_allclose(corr[np.arange(64), flat], corr.max(axis=1), atol=1e-4)
            # the baseline, rotated explicitly with the recorded-seed Haar matrices
            baselines = []
            for r in range(5):
                rotated = [other[l] @ haar_orthogonal(64, [0, k, l, r]).numpy() for l in range(2)]
                baselines.append(np.corrcoef(x.T, np.concatenate(rotated, axis=1).T)[:64, 64:].max(axis=1))
            np.testing.assert_allclose(rows["baseline_max_corr"].values, np.mean(baselines, axis=0), atol=1e-4)


def test_split_half_excess_matches_numpy_float64(run):
    """Each half's excess correlation, from numpy on the cached activations of the rows of its
    documents: the documents are read off the token file here (a separator ends one), and
    grouped into halves by the documented rule."""
    excess = run["excess"]
    ref, *others = [load_layers(p) for p in caches(run["store"])]
    n = ref[0].shape[0]
    with h5py.File(next(run["store"].glob("tokens/*/*.h5")), "r") as f:
        flat, kept = f["tokens"][:, 1:].ravel(), f["keep"][:, 1:].ravel()
    document = np.concatenate([[0], np.cumsum(flat == 0)[:-1]])[kept]  # separators before each analysed row
    split = HalfSplit.by_document(np.flatnonzero(np.diff(document)) + 1, n)
    assert split.documents == document[-1] - document[0] + 1 >= 2
    group = np.searchsorted(split.starts, np.arange(n), side="right") - 1
    for half, column in enumerate(["excess_half_a", "excess_half_b"]):
        rows = split.halves[group] == half
        for layer in range(2):
            x = ref[layer][rows]
            per_other = []
            for k, other in enumerate(others, start=1):
                y = [o[rows] for o in other]
                best = np.corrcoef(x.T, np.concatenate(y, axis=1).T)[:64, 64:].max(axis=1)
                baselines = [np.corrcoef(x.T, np.concatenate([y[l] @ haar_orthogonal(64, [0, k, l, r]).numpy()
                                                               for l in range(2)], axis=1).T)[:64, 64:].max(axis=1)
                             for r in range(5)]
                per_other.append(best - np.mean(baselines, axis=0))
            got = excess.loc[excess.layer == layer, column].values
            np.testing.assert_allclose(got, np.mean(per_other, axis=0), atol=1e-4)


def test_neuron_stats_match_the_model_run_directly(run):
    from transformers import GPT2LMHeadModel

    stats = run["stats"]
    assert list(stats.columns) == STATS_COLUMNS and len(stats) == 128
    model_dir = next(run["store"].glob("zoo/toy-zoo-mini-*/seed-0/checkpoint-300"))
    model = GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    tokens_file = next(run["store"].glob("tokens/*/*.h5"))
    with h5py.File(tokens_file, "r") as f:
        tokens = torch.from_numpy(f["tokens"][:].astype(np.int64))
        keep = torch.from_numpy(f["keep"][:])
    assert not keep[:, 0].any() and not keep[tokens == 0].any(), "BOS and document separators are excluded"
    pre = {}
    hooks = [block.mlp.c_fc.register_forward_hook(
        lambda mod, inp, out, l=l: pre.setdefault(l, []).append(out[keep]))
        for l, block in enumerate(model.transformer.h)]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    # weight columns: on the processed weights, against the numpy fold of the raw state dict
    expected = reference_weight_stats(model_dir)
    for column in WEIGHT_COLUMNS:
        np.testing.assert_allclose(stats[column], expected[column], **TOLERANCE, err_msg=column)
    for layer in range(len(model.transformer.h)):
        rows = stats[stats.layer == layer]
        acts = torch.cat(pre[layer]).double().numpy()
        np.testing.assert_allclose(rows["act_mean"], acts.mean(0), atol=1e-4)
        np.testing.assert_allclose(rows["act_skew"], scipy.stats.skew(acts, axis=0), atol=1e-3)
        np.testing.assert_allclose(rows["act_kurt"], scipy.stats.kurtosis(acts, axis=0, fisher=False), rtol=1e-3)
        # a pre-activation within float32 rounding of 0 may fall on either side in another
        # thread count's product (2 of 6,000 positions did on CI): those count either way
        assert np.all(rows["sparsity"].to_numpy() >= (acts > 1e-5).mean(0) - 1e-6)
        assert np.all(rows["sparsity"].to_numpy() <= (acts > -1e-5).mean(0) + 1e-6)
        assert (np.abs(acts) <= 1e-5).mean() < 1e-3  # so the band is narrow: few positions are ambiguous


def test_universal_selection(run):
    universal, excess = run["universal"], run["excess"]
    expected = excess[excess.excess_correlation >= THRESHOLD].sort_values("excess_correlation", ascending=False)
    assert list(universal[["layer", "neuron"]].itertuples(index=False)) == \
        list(expected[["layer", "neuron"]].itertuples(index=False))
    assert 0 < len(universal) < len(excess) / 2, "the universal set should be a non-empty minority"
    assert set(STATS_COLUMNS) <= set(universal.columns) and list(universal.columns[-5:]) == SPLIT_HALF_COLUMNS
    merged = universal.merge(run["stats"], on=["layer", "neuron"], suffixes=("", "_s"))
    np.testing.assert_allclose(merged["l2_penalty"], merged["l2_penalty_s"])


def test_plots_are_real_images(run):
    for name in ("excess_correlation_distribution", "universal_neurons_by_layer", "excess_correlation_vs_properties"):
        image = np.asarray(Image.open(run["dir"] / "plots" / f"{name}.png").convert("L"), dtype=float)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image.std() > 10, f"{name} looks blank"


def test_neuron_families_match_numpy_float64(run):
    """Every neuron of the reference model explained: the VR of the token-identity features
    (in the store's matrix and as best_vr) against its definition computed in numpy float64
    from the token file and the reference model's activation cache; families and their counts
    consistent with the universal set."""
    from transformers import AutoTokenizer

    from unlib.families import FAMILIES

    d, store = run["dir"], run["store"]
    explained, families = pd.read_csv(d / "neuron_explanations.csv"), pd.read_csv(d / "families.csv")
    counts = pd.read_csv(d / "family_counts.csv")
    assert len(explained) == len(families) == len(run["excess"]) == 128
    assert set(families["family"]) <= set(FAMILIES) and families["best_vr"].between(0, 1).all()
    assert counts["n_universal"].sum() == len(run["universal"]) and counts["n_all"].sum() == 128
    assert (counts["n_universal"] + counts["n_rest"] == counts["n_all"]).all()
    (tokens_file,) = store.glob(f"tokens/*/*_n{N_TOKENS}_*.h5")
    with h5py.File(tokens_file, "r") as f:
        analysed = f["tokens"][:][f["keep"][:]]
    (cache,) = store.glob("activations/*seed-0/checkpoint-300/*.h5")
    layers = load_layers(cache)
    (matrix,) = store.glob("families/*seed-0/checkpoint-300/*/variance_reduction.h5")
    tokenizer = AutoTokenizer.from_pretrained(str(next(store.glob("zoo/*/tokenizer"))))
    by_name: dict[str, list[int]] = {}
    for i in range(len(tokenizer)):
        by_name.setdefault(repr(tokenizer.decode([i])), []).append(i)
    with h5py.File(matrix, "r") as f:
        names = json.loads(f.attrs["features"])
        groups = json.loads(f.attrs["groups"])
        vr = [f[f"layer_{l:03d}"][:] for l in range(len(layers))]
    identity = [i for i, g in enumerate(groups) if g == "token"]
    assert len(identity) > 20
    for layer, a in enumerate(layers):
        # the best VR of each neuron is the largest in its column of the matrix
        best = explained[explained["layer"] == layer].sort_values("neuron")["best_vr"].to_numpy()
        np.testing.assert_allclose(best, vr[layer].max(0), atol=1e-6)
        total = ((a - a.mean(0)) ** 2).sum(0)
        for row in identity[::7]:
            f = np.isin(analysed, by_name[names[row]])
            between = f.sum() * (a[f].mean(0) - a.mean(0)) ** 2 + (~f).sum() * (a[~f].mean(0) - a.mean(0)) ** 2
            expected = np.where(total > 0, between / np.where(total > 0, total, 1), 0)
            np.testing.assert_allclose(vr[layer][row], expected, atol=2e-6)
    record = json.loads((d / "run.json").read_text())["families"]
    assert record["n_features"] == len(names) and record["vocabulary"].endswith("token ids seen in training")


def test_run_record(run):
    record = json.loads((run["dir"] / "run.json").read_text())
    assert record["checkpoint"] == 300 and record["threshold"] == THRESHOLD and record["rotations"] == 5
    # where the correlation's time went, per block: each rotates the other models' layers it reads
    blocks = record["correlation_passes"]
    assert blocks and all(b["rotations_drawn"] % 5 == 0 and 5 <= b["rotations_drawn"] <= 5 * 2 * 2 for b in blocks)
    assert all(0 < b["rotation_seconds"] < b["reduce_seconds"] < b["seconds"] for b in blocks)
    assert all(b["planned_bytes"] > 0 and b["peak_bytes"] > 0 for b in blocks)  # measured against the plan
    share = sum(b["rotation_seconds"] for b in blocks) / sum(b["seconds"] for b in blocks)
    assert record["rotation_share"] == pytest.approx(share, abs=1e-3)
    assert record["n_universal"] == len(run["universal"]) and record["n_neurons"] == 128
    # split-half stability, recomputed from the CSV: the same threshold on each half's excess
    excess = run["excess"]
    half_a = set(excess.loc[excess.excess_half_a >= THRESHOLD, ["layer", "neuron"]].itertuples(index=False))
    half_b = set(excess.loc[excess.excess_half_b >= THRESHOLD, ["layer", "neuron"]].itertuples(index=False))
    assert half_a and half_b
    assert record["n_universal_half_a"] == len(half_a) and record["n_universal_half_b"] == len(half_b)
    assert record["split_half_jaccard"] == pytest.approx(len(half_a & half_b) / len(half_a | half_b))
    html = (run["dir"] / "report.html").read_text()
    shown = re.search(r'id="split-half-jaccard">([^<]*)<', html).group(1)
    assert shown == f"{record['split_half_jaccard']:.3f}"


def test_a_new_threshold_reruns_only_selection_plots_and_report(run, tmp_path):
    """Statistics and excess scores are keyed by what changes them, not by THRESHOLD: a new
    threshold caches nothing, computes no statistics and no correlation, and shares their
    tables; only what depends on the universal set runs (its ablation included)."""
    proc = analyze(run["store"], "--models", MODELS, "--checkpoint", "300", "--n-tokens", str(N_TOKENS),
                   "--threshold", "0.25", "--device", "cpu", "--report-tasks", str(tmp_path / "tasks.json"))
    assert proc.returncode == 0, proc.stderr
    ran = {task.split("_")[0] for task in json.loads((tmp_path / "tasks.json").read_text())["ran_here"]}
    assert ran == {"SelectUniversal", "Plots", "UniversalNeuronsAnalysis", "Ablation", "RunReport"}
    other = run["store"] / "results" / MODELS / (BASE + "_threshold-0.25")
    for name in ("neuron_stats.csv", "excess_correlation_scores.csv", "pairwise_correlations.csv"):
        assert (other / name).read_bytes() == (run["dir"] / name).read_bytes()
        assert (other / name).stat().st_ino == (run["dir"] / name).stat().st_ino, "one file, linked"
    universal = pd.read_csv(other / "universal_neurons.csv")
    assert (universal["excess_correlation"] >= 0.25).all() and len(universal) < len(run["universal"])


def test_another_ablation_moves_only_the_files_that_read_it(run, tmp_path):
    """Outputs are keyed by what changes them: ABLATION_SAMPLES reruns the ablation, run.json
    and the report, into a subfolder; the universal set, tables and plots stay where they are."""
    shared = {p: p.stat().st_mtime_ns for p in run["dir"].rglob("*") if p.is_file()}
    proc = analyze(run["store"], "--models", MODELS, "--checkpoint", "300", "--n-tokens", str(N_TOKENS),
                   "--threshold", str(THRESHOLD), "--device", "cpu", "--ablation-samples", "3",
                   "--report-tasks", str(tmp_path / "tasks.json"))
    assert proc.returncode == 0, proc.stderr
    ran = {task.split("_")[0] for task in json.loads((tmp_path / "tasks.json").read_text())["ran_here"]}
    assert ran == {"UniversalNeuronsAnalysis", "Ablation", "RunReport"}
    assert {p: p.stat().st_mtime_ns for p in shared} == shared  # the first run's files, untouched
    other = run["dir"] / "ablation_ablation_samples-3"
    files = ["ablation.csv", "ablation_summary.csv", "ablation_neurons.csv", "plots/ablation_impact.png", "report.html",
             "run.json"]
    seals = [f".sealed/{f}.json" if "/" not in f else f"plots/.sealed/{f.split('/')[1]}.json" for f in files]
    # the causal checks read no ABLATION_SAMPLES: the report shows the same files, linked
    shown = ["interventions.csv", "interventions_summary.csv", "plots/interventions.png"]
    assert all((other / f).stat().st_ino == (run["dir"] / f).stat().st_ino for f in shown)
    assert sorted(p.relative_to(other).as_posix() for p in other.rglob("*") if p.is_file()) == sorted(
        files + seals + shown)
    assert json.loads((other / "run.json").read_text())["ablation_samples"] == 3
    conditions = set(pd.read_csv(other / "ablation.csv")["condition"])
    assert conditions == {"none", "universal", "random-0", "random-1", "random-2"}
    assert "ablation_ablation_samples-3/report.html" in "".join(proc.stdout.split())  # rich wraps a pipe's lines


def test_other_parameters_do_not_overwrite_and_nothing_is_recomputed(run):
    before = {p: p.stat().st_mtime_ns for p in run["store"].rglob("*.h5")}
    proc = analyze(run["store"], "--models", MODELS, "--checkpoint", "300", "--n-tokens", str(N_TOKENS),
                   "--top-k", "5", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    top = pd.read_csv(run["store"] / "results" / MODELS / (BASE + "_top_k-5")
                      / "universal_neurons.csv")
    assert len(top) == 5
    assert list(top["neuron"]) == list(run["excess"].sort_values("excess_correlation", ascending=False)["neuron"][:5])
    assert {p: p.stat().st_mtime_ns for p in before} == before  # caches and correlations reused
    assert (run["dir"] / "universal_neurons.csv").exists()


@pytest.mark.slow
def test_all_references_without_cache_give_the_cached_numbers(run, tmp_path):
    proc = analyze(tmp_path, "--models", MODELS, "--checkpoint", "300", "--n-tokens", str(N_TOKENS),
                   "--threshold", str(THRESHOLD), "--device", "cpu", "--reference", "all", "--cache", "0")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "activations").exists(), "CACHE=0 must not write activation caches"
    base = BASE
    by_reference = lambda ref: f"{BASE}_reference-{ref}"  # noqa
    streamed = pd.read_csv(tmp_path / "results" / MODELS / base / "pairwise_correlations.csv")
    np.testing.assert_allclose(streamed["max_corr"], run["pairwise"]["max_corr"], atol=1e-5)
    np.testing.assert_allclose(streamed["baseline_max_corr"], run["pairwise"]["baseline_max_corr"], atol=1e-5)
    for ref in (1, 2):
        other = pd.read_csv(tmp_path / "results" / MODELS / by_reference(ref) / "pairwise_correlations.csv")
        assert set(other["other_model"]) == {f"{MODELS}/seed-{m}" for m in range(3) if m != ref}
    # symmetry: seed-0's best match in seed-1 has a correlation no larger than seed-1's best in seed-0 overall
    one = pd.read_csv(tmp_path / "results" / MODELS / by_reference(1) / "pairwise_correlations.csv")
    assert np.isclose(one[one.other_model == f"{MODELS}/seed-0"]["max_corr"].max(),
                      run["pairwise"][run["pairwise"].other_model == f"{MODELS}/seed-1"]["max_corr"].max(), atol=1e-5)
    assert "no cache" in proc.stderr and "CACHE=0" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--models", "no-such-set"], "unknown model set"),
    (["--models", MODELS, "--checkpoint", "120"], "nearest: 100 or 300"),
    (["--models", MODELS, "--reference", "7"], "out of range"),
    (["--models", MODELS, "--threshold", "3"], "outside [-1, 1]"),
    (["--models", "stanford-gpt2-small", "--checkpoint", "1234"], "nearest: 1200 or 1250"),
    (["--models", "pythia-160m", "--checkpoint", "700"], "nearest: 512 or 1000"),
    (["--models", "pythia-160m", "--checkpoint", "4000"],
     "`hf download EleutherAI/pythia-160m --revision step4000`"),
    (["--n-tokens", "many"], "N_TOKENS must be an integer, not 'many'"),
    (["--models", MODELS, "--n-tokens", "4000"], "N_TOKENS=4000 is too small: use at least 4096 tokens"),
    (["--models", MODELS, "--corr-memory", "lots"], "CORR_MEMORY='lots' is not a size"),
    (["--models", MODELS, "--cache", "maybe"], "CACHE='maybe' must be 1"),
    (["--models", MODELS, "--corr-memory", "64K"], "raise CORR_MEMORY"),
    (["--models", MODELS, "--ctx-len", "65"], "longer than model toy-zoo-mini/seed-0 takes (64 tokens)"),
    (["--models", MODELS, "--scheduler", "central", "--scheduler-port", "1"], "no luigid started for this store answers on 127.0.0.1:1"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    # in this process, but the first case from a fresh interpreter: the command line as typed
    fresh = args == ["--models", "no-such-set"]
    proc = analyze(tmp_path, *args) if fresh else cli_in_process(tmp_path, "analyze", "--scheduler", "local", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "results").exists()
