"""The seed document's API as its users write it, against the mini zoo: the notebook snippets
(`universal_neurons_clean`, the pipeline's own objects; dataset_path as a dataset name, a file
or token ids; batch_size; device) run from another working directory with UNLIB_STORE set,
printing nothing, and give the command line's numbers; the computer scores folders, a model
set and loaded models alike; the installed package (a wheel, and editable) finds its settings,
data and store from any directory, and its `universal-neurons --test` exits 0."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from unlib.config import PARAMETERS
from unlib.engine.precision import default_precision
from unlib.engine.tables import DEAD_COLUMN, EXCESS_COLUMNS, SPLIT_HALF_COLUMNS

REPO = Path(__file__).resolve().parent.parent
MODELS, CHECKPOINT, N_TOKENS, THRESHOLD, BATCH = "toy-zoo-mini", 300, 8192, 0.1, 16
TABLES = ("excess", "pairwise", "stats", "universal", "layer_summary")
# THRESHOLD: the set's own; PRECISION=fp32 (numpy float64's numbers to float32 rounding) names the folder
RESULTS = f"results/{MODELS}/checkpoint-{CHECKPOINT}_n_tokens-{N_TOKENS}" + \
    ("" if default_precision("cpu") == "fp32" else "_precision-fp32")

# The seed's notebook cell, with this project's model set; it saves what it got for the test.
NOTEBOOK = f"""
from universal_neurons_clean import (run_universal_neurons_analysis, MemoryEfficientExcessCorrelationComputer,
                                     UniversalNeuronAnalyzer)

results = run_universal_neurons_analysis(model_names="{MODELS}", dataset_path="python-stdlib",
                                         checkpoint_value={CHECKPOINT}, excess_threshold={THRESHOLD},
                                         n_tokens={N_TOKENS}, batch_size={BATCH}, device="cpu", precision="fp32")
analyzer = UniversalNeuronAnalyzer(results["excess"])
universal = analyzer.identify_universal_neurons(excess_threshold={THRESHOLD})

import os
os.makedirs("out", exist_ok=True)
for name, table in {{**results, "selected": universal}}.items():
    table.to_csv(f"out/{{name}}.csv", index=False)
"""


def notebook_env(**extra: str) -> dict:
    """A notebook's environment: this checkout importable (as `pip install -e .` makes it),
    offline, and no TOKENIZERS_PARALLELISM (the Makefile's setting is not there)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "UNLIB_STORE")}
    return {**env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **extra}


def python(code: str, cwd: Path, env: dict, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def notebook(tmp_path_factory, mini_zoo):
    """The notebook cell on a store holding only the trained mini zoo, run from a folder of its own."""
    root = tmp_path_factory.mktemp("seed")
    work = root / "notebook"
    work.mkdir()
    store = root / "store"
    shutil.copytree(mini_zoo, store / "zoo")
    proc = python(NOTEBOOK, work, notebook_env(UNLIB_STORE=str(store)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tables = {name: pd.read_csv(work / "out" / f"{name}.csv") for name in (*TABLES, "selected")}
    return {"root": root, "work": work, "store": store, "proc": proc, "tables": tables}


def assert_tables_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=False,
                                  rtol=1e-5, atol=1e-6)


def test_the_notebook_cell_prints_nothing_and_writes_to_its_store(notebook):
    assert notebook["proc"].stdout == "" and notebook["proc"].stderr == ""
    assert (notebook["store"] / RESULTS / "run.json").exists()
    assert not (notebook["work"] / "store").exists(), "the store is where UNLIB_STORE says, not in the cwd"
    tables = notebook["tables"]
    assert list(tables["excess"].columns) == EXCESS_COLUMNS + SPLIT_HALF_COLUMNS + [DEAD_COLUMN] and len(tables["excess"]) == 128
    assert 0 < len(tables["universal"]) < 64
    assert_tables_equal(tables["selected"][["layer", "neuron"]], tables["universal"][["layer", "neuron"]])


def test_the_notebook_gives_the_command_lines_results(notebook, tmp_path):
    """The same run through `python -m tasks analyze` on a fresh store (the trained zoo copied)."""
    store = tmp_path / "store"
    shutil.copytree(notebook["store"] / "zoo", store / "zoo")
    env = {**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tasks", "analyze", "--scheduler", "local", "--models", MODELS,
                           "--checkpoint", str(CHECKPOINT), "--n-tokens", str(N_TOKENS), "--threshold", str(THRESHOLD),
                           "--batch-size", str(BATCH), "--device", "cpu",
                           "--precision", "fp32"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = {"excess": "excess_correlation_scores", "pairwise": "pairwise_correlations", "stats": "neuron_stats",
             "universal": "universal_neurons"}
    for name, file in files.items():
        assert_tables_equal(notebook["tables"][name], pd.read_csv(store / RESULTS / f"{file}.csv"))
    run = json.loads((store / RESULTS / "run.json").read_text())
    assert run["n_universal"] == len(notebook["tables"]["universal"])


@pytest.fixture(scope="module")
def heldout_file(notebook):
    """A dataset file: the offline corpus's held-out documents as .jsonl."""
    from unlib.dataset import offline_corpus

    path = notebook["root"] / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in offline_corpus("heldout")["text"]))
    return path


def test_the_computer_scores_folders_as_it_scores_loaded_models(notebook, heldout_file):
    from universal_neurons_clean import MemoryEfficientExcessCorrelationComputer
    from unlib.model_loading import load_model
    from unlib.model_sets import ModelSpec

    folders = [str(p) for p in sorted(notebook["store"].glob(f"zoo/{MODELS}-*/seed-*/checkpoint-{CHECKPOINT}"))]
    assert len(folders) == 3
    # the seed's cell, with two of the zoo's folders and a dataset file (and fewer tokens than
    # the default 100000, for speed)
    computer = MemoryEfficientExcessCorrelationComputer(folders[:2], device="cpu")
    excess = computer.compute_excess_correlations_for_all_neurons(str(heldout_file), n_tokens=N_TOKENS)
    assert list(excess.columns) == EXCESS_COLUMNS + SPLIT_HALF_COLUMNS + [DEAD_COLUMN] and len(excess) == 128
    assert np.isfinite(excess[["excess_correlation", "excess_se"]].values).all()
    assert (excess["n_models_compared"] == 1).all() and excess["excess_correlation"].max() > THRESHOLD

    loaded = [load_model(ModelSpec(f, f), None, "cpu") for f in folders[:2]]
    again = MemoryEfficientExcessCorrelationComputer(loaded).compute_excess_correlations_for_all_neurons(
        str(heldout_file), n_tokens=N_TOKENS)
    pd.testing.assert_frame_equal(excess, again)


def test_the_computer_on_the_set_name_gives_the_pipelines_scores(notebook, monkeypatch):
    from universal_neurons_clean import MemoryEfficientExcessCorrelationComputer

    monkeypatch.setenv("UNLIB_STORE", str(notebook["store"]))
    computer = MemoryEfficientExcessCorrelationComputer(MODELS, device="cpu", checkpoint=CHECKPOINT)
    assert computer.model_names == [f"{MODELS}/seed-{s}" for s in range(3)]
    excess = computer.compute_excess_correlations_for_all_neurons("python-stdlib", n_tokens=N_TOKENS,
                                                                  batch_size=BATCH, precision="fp32")
    pipeline = notebook["tables"]["excess"]
    # the same tokens (tokenized by the same code); the activations stream in other chunks
    assert np.abs(excess["excess_correlation"] - pipeline["excess_correlation"]).max() < 1e-5
    assert np.abs(excess["excess_se"] - pipeline["excess_se"]).max() < 1e-5


def test_an_untrained_zoo_is_one_clear_error(tmp_path, monkeypatch):
    from universal_neurons_clean import MemoryEfficientExcessCorrelationComputer
    from unlib.model_sets import ModelError

    monkeypatch.setenv("UNLIB_STORE", str(tmp_path))
    with pytest.raises(ModelError, match="is not trained in the store"):
        MemoryEfficientExcessCorrelationComputer(MODELS, device="cpu")


def test_dataset_path_takes_token_ids(notebook, monkeypatch):
    """Token ids (a tensor) enter the graph as a .npy dataset: the token stream of the
    python-stdlib run, given as one array (its documents split at the separator, so that the
    ablation's held-out documents follow the analysed ones), makes the same token file and results."""
    from universal_neurons_clean import run_universal_neurons_analysis
    from unlib.dataset import load_texts
    from unlib.model_loading import load_tokenizer
    from unlib.model_sets import resolve_model_set
    from unlib.tokens import first_tokens

    monkeypatch.setenv("UNLIB_STORE", str(notebook["store"]))
    token_file = next(notebook["store"].glob(f"tokens/python-stdlib*/*_n{N_TOKENS}_*.h5"))
    with h5py.File(token_file, "r") as f:
        tokens, keep = f["tokens"][:], f["keep"][:]
    tokenizer = load_tokenizer(resolve_model_set(MODELS, notebook["store"]), notebook["store"])
    stream = first_tokens(load_texts("python-stdlib"), tokenizer, tokenizer.bos_token_id, 1_000_000)
    assert np.array_equal(stream[:tokens[:, 1:].size], tokens[:, 1:].ravel())  # the analysed tokens lead it
    ids = torch.from_numpy(stream.astype(np.int64))
    results = run_universal_neurons_analysis(model_names=MODELS, dataset_path=ids, checkpoint_value=CHECKPOINT,
                                             excess_threshold=THRESHOLD, n_tokens=N_TOKENS, batch_size=BATCH,
                                             device="cpu", precision="fp32")
    saved = notebook["store"].glob("datasets/token-ids-*.npy")
    assert any(np.array_equal(np.load(p), ids.numpy()) for p in saved)
    (from_ids,) = [p for p in notebook["store"].glob(f"tokens/*/*_n{N_TOKENS}_*.h5") if p != token_file]
    with h5py.File(from_ids, "r") as f:
        assert np.array_equal(f["tokens"][:], tokens) and np.array_equal(f["keep"][:], keep)
    for name in TABLES:
        assert_tables_equal(results[name], notebook["tables"][name])


@pytest.mark.parametrize("ids, message", [
    (np.array([0.5, 1.5]), "dataset_path (a dataset path or name, or token ids) must hold non-negative integer"),
    (np.array([3, -1, 4] * 3000), "must hold non-negative integer token ids"),
    (np.full(9000, 5000), "token id 5000 is not in the tokenizer's vocabulary (257 tokens)"),
])
def test_bad_token_ids_are_one_clear_error(notebook, monkeypatch, ids, message):
    from universal_neurons_clean import run_universal_neurons_analysis
    from unlib import UserError

    monkeypatch.setenv("UNLIB_STORE", str(notebook["store"]))
    saved = set(notebook["store"].glob("datasets/*"))
    with pytest.raises(UserError) as error:
        run_universal_neurons_analysis(model_names=MODELS, dataset_path=ids, checkpoint_value=CHECKPOINT,
                                       n_tokens=N_TOKENS, device="cpu")
    assert message in str(error.value)
    if "vocabulary" not in message:  # refused before anything is written
        assert set(notebook["store"].glob("datasets/*")) == saved


@pytest.mark.parametrize("given, message", [
    ({"excess_threshold": 5}, "excess_threshold=5 is outside [-1, 1]"),
    ({"n_tokens": 100}, "n_tokens=100 is too small"),
    ({"checkpoint_value": 123}, "has no checkpoint at step 123")])
def test_api_refusals_name_the_api_arguments(tmp_path, monkeypatch, given, message):
    """The refusals name the arguments as the caller wrote them, not Make's variables
    (THRESHOLD=5 for excess_threshold=5)."""
    from universal_neurons_clean import run_universal_neurons_analysis

    monkeypatch.setenv("UNLIB_STORE", str(tmp_path))
    with pytest.raises(ValueError) as error:
        run_universal_neurons_analysis(model_names="toy-zoo-mini", device="cpu", **given)
    assert str(error.value).startswith(message) or message in str(error.value), str(error.value)
    assert not any(p.make_variable + "=" in str(error.value) for p in PARAMETERS)


def test_importing_prints_nothing(tmp_path):
    proc = python("import universal_neurons_clean", tmp_path, notebook_env())
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


def test_the_seed_flags_map_onto_the_commands(tmp_path):
    from tasks.__main__ import TEST_MODELS, seed_argv

    assert seed_argv(["--test"]) == ["analyze", "--quick", "--models", TEST_MODELS]
    assert seed_argv(["--checkpoint", "250"]) == ["analyze", "--checkpoint", "250"]
    assert seed_argv(["--compare-checkpoints", "100 250"]) == ["compare", "--checkpoints", "100 250"]
    assert seed_argv(["--test", "--compare-checkpoints=100 300", "--models", "a,b"]) == \
        ["compare", "--quick", "--checkpoints=100 300", "--models", "a,b"]
    assert seed_argv(["analyze", "--quick"]) == ["analyze", "--quick"]
    proc = subprocess.run([sys.executable, "-m", "universal_neurons_clean", "--help"], cwd=tmp_path,
                          env=notebook_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--compare-checkpoints" in proc.stdout, proc.stderr


def test_the_default_store_is_absolute(tmp_path, monkeypatch):
    from unlib.store import default_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNLIB_STORE", "relative/store")
    assert default_root() == tmp_path / "relative" / "store"
    monkeypatch.delenv("UNLIB_STORE")
    assert default_root() == REPO / "store", "in a checkout, its store/ whatever the current directory"


needs_setuptools = pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                                      reason="building the package needs setuptools in this environment")


def source_copy(tmp_path: Path) -> Path:
    """The project's files, without the store, environments and caches."""
    ignore = shutil.ignore_patterns(".git", ".venv", "store", "__pycache__", "build", "dist", "*.egg-info",
                                    ".pytest_cache", "tests", "bench")
    return Path(shutil.copytree(REPO, tmp_path / "src", ignore=ignore))


def pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


WHERE = "import tasks.common as c, tasks.targets as t, unlib.paper_reference as r; print(c.LUIGI_CFG, r.REFERENCE_DATA, t.store().root, sep='\\n')"


@needs_setuptools
@pytest.mark.slow
def test_the_installed_wheel_works_from_any_directory(notebook, tmp_path):
    src = source_copy(tmp_path)
    pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(tmp_path / "dist"), ".", cwd=src)
    target = tmp_path / "site"
    pip("install", "--no-deps", "--quiet", "--target", str(target), *map(str, (tmp_path / "dist").glob("*.whl")),
        cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = notebook_env(PYTHONPATH=str(target), XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = python(WHERE, elsewhere, env)
    assert proc.returncode == 0, proc.stderr
    luigi_cfg, reference_data, root = map(Path, proc.stdout.split())
    assert luigi_cfg == target / "tasks" / "luigi.cfg" and luigi_cfg.is_file()
    assert reference_data == target / "unlib" / "reference_data" and len(list(reference_data.glob("*.csv"))) == 3
    assert root == tmp_path / "cache" / "universal-neurons" / "store", "an installed copy's default store"
    # the console command, the seed's smoke run, on the store where the zoo is trained
    env["UNLIB_STORE"] = str(notebook["store"])
    proc = subprocess.run([str(target / "bin" / "universal-neurons"), "--test", "--device", "cpu", "--scheduler",
                           "local"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Universal neurons" in proc.stdout
    assert (notebook["store"] / f"results/{MODELS}/checkpoint-300_n_tokens-4096/run.json").exists()


@needs_setuptools
def test_the_editable_install_points_at_its_checkout(tmp_path):
    src = source_copy(tmp_path)
    prefix = tmp_path / "prefix"
    pip("install", "--no-deps", "--no-build-isolation", "--quiet", "--prefix", str(prefix), "-e", ".", cwd=src)
    (site_packages,) = prefix.glob("lib/python*/site-packages")
    code = f"import site; site.addsitedir({str(site_packages)!r}); import universal_neurons_clean; {WHERE}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = notebook_env()
    del env["PYTHONPATH"]
    proc = python(code, elsewhere, env)
    assert proc.returncode == 0, proc.stderr
    assert [Path(p) for p in proc.stdout.split()] == [src / "tasks" / "luigi.cfg", src / "unlib" / "reference_data",
                                                      src / "store"]
