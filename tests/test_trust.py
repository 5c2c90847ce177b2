"""Keys that follow content, and results that are verified: a model or dataset changed in
place, two model lists whose folders share names, and truncated or deleted results files
all give the results a fresh store gives, never a stale or a colliding one. Small GPT-2
models saved to a temp folder, a local .jsonl dataset."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tasks.api import build_analyses
from unlib.config import RunConfig
from tasks.report import RunReport
from unlib.zoo import train_tokenizer

REPO = Path(__file__).resolve().parent.parent
CTX = 32
ARGS = ["--scheduler", "local", "--device", "cpu", "--n-tokens", "4096", "--threshold", "0.1",
        "--exclude-tokens", "bos"]
RESULTS = ["excess_correlation_scores.csv", "pairwise_correlations.csv", "neuron_stats.csv",
           "universal_neurons.csv", "run.json"]


def documents(seed: int, n: int = 600) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "x", "y", "=", "+", "(", ")", ":"]
    return [" ".join(rng.choice(words, size=rng.integers(8, 40))) for _ in range(n)]


def save_model(folder: Path, seed: int, vocab_size: int) -> None:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_inner=48, n_head=4, n_positions=CTX, vocab_size=vocab_size)
    GPT2LMHeadModel(config).save_pretrained(str(folder))


def write_dataset(path: Path, seed: int) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(seed)))


def analyze(store: Path, models: list[Path], dataset: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tasks", "analyze", *ARGS, "--models", ",".join(map(str, models)),
                           "--dataset", str(dataset)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def results_dir(store: Path) -> Path:
    (found,) = store.glob("results/*/final*")
    return found


def tables(folder: Path) -> dict[str, bytes]:
    """The results files' bytes (run.json without its finishing time)."""
    out = {name: (folder / name).read_bytes() for name in RESULTS if name != "run.json"}
    run = json.loads((folder / "run.json").read_text())
    del run["finished"], run["correlation_seconds"]
    out["run.json"] = json.dumps(run, sort_keys=True).encode()
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two experiments whose model folders share names (exp1/m0, exp1/m1; exp2/m0, exp2/m1),
    with different weights, and a dataset."""
    root = tmp_path_factory.mktemp("trust")
    tokenizer = train_tokenizer(documents(0), 300, 10**6, root / "tokenizer")
    for exp, seeds in (("exp1", (0, 1)), ("exp2", (2, 3))):
        for name, seed in zip(("m0", "m1"), seeds):
            save_model(root / exp / name, seed, len(tokenizer))
            tokenizer.save_pretrained(str(root / exp / name))
    write_dataset(root / "docs.jsonl", 0)
    return root


def models(root: Path, exp: str) -> list[Path]:
    return [root / exp / "m0", root / exp / "m1"]


@pytest.fixture(scope="module")
def exp1_store(root, tmp_path_factory):
    """A store holding the analysis of exp1 (copied by the tests that change it)."""
    store = tmp_path_factory.mktemp("exp1") / "store"
    analyze(store, models(root, "exp1"), root / "docs.jsonl")
    return store


def test_lists_whose_folders_share_names_get_their_own_results(root, exp1_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(exp1_store, store)
    second = analyze(store, models(root, "exp2"), root / "docs.jsonl")
    assert ": 0 tasks run here" not in second.stdout
    names = sorted(p.name for p in (store / "results").iterdir())
    assert len(names) == 2 and names[0].startswith("exp1-m0+exp1-m1-") and names[1].startswith("exp2-m0+exp2-m1-")
    one, two = (next((store / "results" / n).glob("final*")) for n in names)
    assert json.loads((two / "run.json").read_text())["models"] == [str(p) for p in models(root, "exp2")]
    assert (one / "excess_correlation_scores.csv").read_bytes() != (two / "excess_correlation_scores.csv").read_bytes()


@pytest.mark.slow
def test_a_model_retrained_into_its_folder_is_recomputed(root, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(root / "exp1", work / "exp1")
    store = tmp_path / "store"
    analyze(store, models(work, "exp1"), root / "docs.jsonl")
    before = tables(results_dir(store))
    save_model(work / "exp1" / "m0", 7, len(AutoTokenizer.from_pretrained(str(root / "exp1" / "m0"))))
    again = analyze(store, models(work, "exp1"), root / "docs.jsonl")
    changed = work / "exp1" / "m0"
    assert f"model {changed} changed since it was written" in again.stderr, again.stderr
    after = tables(results_dir(store))
    assert after["excess_correlation_scores.csv"] != before["excess_correlation_scores.csv"]
    fresh = tmp_path / "fresh"
    analyze(fresh, models(work, "exp1"), root / "docs.jsonl")
    assert tables(results_dir(fresh)) == after


@pytest.mark.slow
def test_a_dataset_edited_in_place_is_tokenized_again(root, tmp_path):
    dataset = tmp_path / "docs.jsonl"
    write_dataset(dataset, 0)
    store = tmp_path / "store"
    analyze(store, models(root, "exp1"), dataset)
    before = tables(results_dir(store))
    write_dataset(dataset, 1)
    again = analyze(store, models(root, "exp1"), dataset)
    assert f"dataset file {dataset.resolve()} changed since it was written" in again.stderr
    assert len(list(store.glob("tokens/*/*.h5"))) == 1  # rebuilt in place, not beside the stale one
    after = tables(results_dir(store))
    assert after["excess_correlation_scores.csv"] != before["excess_correlation_scores.csv"]
    fresh = tmp_path / "fresh"
    analyze(fresh, models(root, "exp1"), dataset)
    assert tables(results_dir(fresh)) == after


def test_damaged_results_files_are_rebuilt_byte_identical(root, exp1_store, tmp_path, monkeypatch):
    store = tmp_path / "store"
    shutil.copytree(exp1_store, store)
    folder = results_dir(store)
    files = RESULTS + ["report.html", "plots/universal_neurons_by_layer.png"]
    expected = {name: (folder / name).read_bytes() for name in files}
    monkeypatch.setenv("UNLIB_STORE", str(store))
    (analysis,) = build_analyses(RunConfig(models=",".join(map(str, models(root, "exp1"))),
                                           dataset=str(root / "docs.jsonl"), n_tokens=4096, threshold=0.1,
                                           exclude_tokens="bos", device="cpu"))
    report = analysis.clone(RunReport)
    assert report.complete()
    for name in files:  # each file alone: the report, root of the graph, is no longer complete
        path = folder / name
        path.write_bytes(expected[name][: len(expected[name]) // 2])
        assert not report.complete(), name
        path.unlink()
        assert not report.complete(), name
        path.write_bytes(expected[name])
        assert report.complete(), name
    for name in files:  # then all at once, for real: rebuilt, the tables byte-identical
        path = folder / name
        path.write_bytes(expected[name][: len(expected[name]) // 2]) if name.endswith(".csv") else path.unlink()
    proc = analyze(store, models(root, "exp1"), root / "docs.jsonl")
    assert "truncated" in proc.stderr
    for name in files:
        if name.endswith(".csv"):
            assert (folder / name).read_bytes() == expected[name], name
        else:  # run.json and the report record when they were written
            assert (folder / name).stat().st_size > 0.5 * len(expected[name]), name
