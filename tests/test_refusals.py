"""What cannot be meant is refused before any work: one line `error: ...` saying what is
wrong and how to fix it, exit status 2, no traceback, and the store untouched. Each case
runs the command line (`python -m tasks analyze`) as a user would; variants of a case that
share its code path are checked in-process."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unlib import UserError
from unlib.dataset import DatasetError, check_dataset, load_texts, txt_documents
from unlib.model_loading import load_model, resolve_device
from unlib.model_sets import ModelError, ModelSpec, resolve_model_set

from conftest import REPO, cli_in_process
MINI = "toy-zoo-mini"  # 2 layers of 64 neurons; refused before its zoo is ever trained


def analyze(store: Path, *args: str, python: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*(python or [sys.executable]), "-m", "tasks", "analyze", "--scheduler", "local",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def snapshot(path: Path) -> list:
    """Everything under a path (names, sizes, modification times), or None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return [(path.name, path.stat().st_size, path.stat().st_mtime_ns)]
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def refused(store: Path, message: str, *args: str, in_process: bool = True) -> str:
    """Run the command (in this process unless `in_process` is False) and check the refusal:
    exit 2, only one line (on stderr), the message in it, no traceback, and the store as it was."""
    before = snapshot(store)
    proc = cli_in_process(store, "analyze", "--scheduler", "local", *args) if in_process else analyze(store, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0], lines[0]
    assert snapshot(store) == before, "the store changed"
    return lines[0]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Two tiny GPT-2 models sharing a tokenizer, and a store holding one file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from unlib.zoo import train_tokenizer

    root = tmp_path_factory.mktemp("local")
    tokenizer = train_tokenizer(["def f(x):\n    return x * 2\n"] * 50, 300, 10**5, root / "tokenizer")
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_inner=32, n_head=2, n_positions=64, bos_token_id=0,
                                   eos_token_id=0, vocab_size=len(tokenizer))).save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
    return root


@pytest.fixture
def store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "kept.txt").write_text("the store holds this file, untouched\n")
    return store


# ---- models ----------------------------------------------------------------------------
def test_a_model_listed_twice(local, store):
    line = refused(store, "listed twice in MODELS", "--models", f"{local}/a,{local}/a")
    assert "list each model once" in line
    assert resolve_model_set(f"{local}/a,{local}/b").name.startswith(f"{local.name}-a+{local.name}-b-")  # two are fine


def test_the_same_folder_spelled_two_ways(local, store):
    other = os.path.relpath(local / "a", REPO)  # relative to the command's working directory
    refused(store, "listed twice in MODELS", "--models", f"{local}/a,{other}")
    os.symlink(local / "a", local / "link-to-a")
    with pytest.raises(ModelError, match="listed twice"):
        resolve_model_set(f"{local}/a,{local}/b,{local}/link-to-a")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_model_whose_weights_do_not_load_is_named(local, store, tmp_path, damage):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(local / "b", broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:
        weights.unlink()
    message = "holds no weights" if damage == "missing" else f"model weights file {weights} does not load"
    refused(store, message, "--models", f"{local}/a,{broken}", "--n-tokens", "4096")
    # the loader names the file too, when it is reached (e.g. a folder damaged mid-run)
    with pytest.raises(ModelError, match=message.split(" {")[0] if damage == "missing" else "does not load"):
        load_model(ModelSpec("broken", str(broken)), None)


def test_a_load_failure_the_headers_do_not_show_names_the_folder_and_its_weights(local, tmp_path):
    import shutil

    mismatched = tmp_path / "mismatched"
    shutil.copytree(local / "a", mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "n_inner": 64}))  # weights hold 32
    with pytest.raises(ModelError, match=re.escape(f"cannot load model m from {mismatched} (model.safetensors)")):
        load_model(ModelSpec("m", str(mismatched)), None)


# ---- numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-5"])
def test_n_tokens_zero_or_negative(store, value):
    # the command line itself, once: the same refusal from a fresh interpreter
    refused(store, f"N_TOKENS={value} is too small: use at least 4096", "--models", MINI, "--n-tokens", value,
            in_process=value != "0")


def test_top_k_above_the_number_of_neurons(store):
    line = refused(store, "TOP_K=129 is more than the 128 neurons of the reference model", "--models", MINI,
                   "--top-k", "129")
    assert "use at most 128" in line


@pytest.mark.parametrize("value", ["0", "-2"])
def test_workers_below_one(store, value):
    refused(store, f"WORKERS={value} must be at least 1", "--models", MINI, "--workers", value)


# ---- devices ---------------------------------------------------------------------------
@pytest.mark.parametrize("device, message", [("tpu", "DEVICE='tpu' is not a device: use auto, cpu, cuda"),
                                             ("mps", "MPS"), ("cuda:99", "DEVICE=cuda:99 but")])
def test_unknown_or_missing_device(store, device, message):
    if device == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    refused(store, message, "--models", MINI, "--device", device)


def test_device_names_are_case_insensitive():
    assert resolve_device("CPU") == "cpu" and resolve_device(" Cpu ") == "cpu"
    assert resolve_device("AUTO") in ("cpu", "cuda")
    if torch.cuda.is_available():
        assert resolve_device("CUDA:0") == "cuda:0"
    else:
        with pytest.raises(ModelError, match="no CUDA GPU"):
            resolve_device("CUDA")
    with pytest.raises(ModelError, match="is not a device"):
        resolve_device("gpu")


# ---- the store -------------------------------------------------------------------------
def test_a_store_that_is_a_file(tmp_path):
    store = tmp_path / "store"
    store.write_text("not a folder\n")
    refused(store, "is a file, not a folder", "--models", MINI)
    refused(store / "inside", "cannot be created", "--models", MINI)
    assert store.read_text() == "not a folder\n"


def test_a_read_only_store(store, monkeypatch):
    from tasks.api import build_analyses
    from unlib.config import RunConfig

    if os.geteuid() != 0:  # permissions bind everyone but root: the real thing
        store.chmod(0o555)
        try:
            refused(store, "is not writable", "--models", MINI)
        finally:
            store.chmod(0o755)
        return
    # root writes through permission bits; a read-only file system is what access(2) reports
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == store else real(p, mode, **kw))
    monkeypatch.setenv("UNLIB_STORE", str(store))
    before = snapshot(store)
    with pytest.raises(UserError, match="is not writable"):
        build_analyses(RunConfig(models=MINI))
    with pytest.raises(UserError, match="cannot be created:.*is not writable"):
        monkeypatch.setenv("UNLIB_STORE", str(store / "sub"))
        build_analyses(RunConfig(models=MINI))
    assert snapshot(store) == before


# ---- datasets --------------------------------------------------------------------------
LATIN1 = "caf\xe9 au lait\n".encode("latin-1")


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "is empty"),
    ("latin1.txt", b"first line\n" + LATIN1, "is not UTF-8 text: byte 0xe9 at byte offset 14 (line 2)"),
    ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is binary, not text: a NUL byte at byte offset 8"),
    ("bad.jsonl", b'{"text": "one"}\n{"text": "two"\n', "line 2 is not valid JSON (column 15, byte offset 30"),
    ("parquet.parquet", b"PAR1 but not really", "is not a Parquet file"),
])
def test_a_dataset_file_that_cannot_be_read_is_named(store, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    refused(store, f"dataset file {path.resolve()} {message}", "--models", MINI, "--dataset", str(path))


@pytest.mark.parametrize("name, content, message", [
    ("blank.txt", b"\n  \n\t\n", "is empty"),
    ("invalid-utf8.txt", b"ok\n\xff\xfe\n", "byte 0xff at byte offset 3 (line 2)"),
    ("notext.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', "line 3 is not a JSON object with a string 'text' field"),
    ("number.jsonl", b'{"text": 5}\n', "line 1 is not a JSON object with a string 'text' field"),
    ("empty.jsonl", b"\n\n", "is empty: it holds no documents"),
    ("latin1.jsonl", b'{"text": "' + LATIN1.strip() + b'"}\n', "byte 0xe9 at byte offset 13 (line 1)"),
    ("broken.json", b'[{"text": "a"},\n {"text": ]', "is not valid JSON at line 2, column 11"),
    ("object.json", b'{"text": "a"}', None),  # one object: JSON lines of one line
    ("array.json", b'[{"text": "a"}, {"text": "b"}]', None),
])
def test_dataset_content_variants(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    if message is None:
        check_dataset(str(path))
        return
    with pytest.raises(DatasetError, match=f"dataset file {path.resolve()}"):
        check_dataset(str(path))
    with pytest.raises(DatasetError) as caught:
        check_dataset(str(path))
    assert message in str(caught.value), str(caught.value)


def test_parquet_without_text_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "body.parquet")
    with pytest.raises(DatasetError, match="has no 'text' column"):
        check_dataset(str(tmp_path / "body.parquet"))
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "good.parquet")
    check_dataset(str(tmp_path / "good.parquet"))
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(DatasetError, match="are not files"):
        check_dataset(str(tmp_path / "folder.txt"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_dataset_file(store, tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("hidden\n")
    path.chmod(0)
    refused(store, "cannot be read", "--models", MINI, "--dataset", str(path))


def test_txt_documents_are_paragraphs_with_their_newlines(tmp_path):
    paragraphs = ["def add(a, b):\n    return a + b", "first line\nsecond line", "x = 1\n  indented\ty"]
    text = "\n\n".join(paragraphs[:2]) + "\n \n\t\n\n" + paragraphs[2] + "\n"
    assert txt_documents(text) == paragraphs
    assert txt_documents("a\r\nb\r\n\r\nc\r\n") == ["a\r\nb", "c"]
    (tmp_path / "docs.txt").write_text(text)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    # the same documents in the same seeded order, whichever file holds them
    assert list(load_texts(str(tmp_path / "docs.txt"))) == list(load_texts(str(tmp_path / "docs.jsonl")))
    assert sorted(load_texts(str(tmp_path / "docs.txt"))) == sorted(paragraphs)


# ---- the interpreter -------------------------------------------------------------------
def test_an_interpreter_without_the_dependencies(store):
    """`make analyze PYTHON=...` with an interpreter lacking the packages (here: ours without
    its site-packages, -S): one line naming the package and how to install it."""
    before = snapshot(store)
    proc = subprocess.run(["make", "--no-print-directory", "analyze", f"PYTHON={sys.executable} -S",
                           f"MODELS={MINI}"], cwd=REPO, env={**os.environ, "UNLIB_STORE": str(store)},
                          capture_output=True, text=True, timeout=120)
    # make adds its own "make: ***" line ("make[1]: ***" when this suite itself runs under make)
    ours = [line for line in proc.stderr.strip().splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert len(ours) == 1 and ours[0].startswith("error: the Python package '"), proc.stderr
    assert "is missing from" in ours[0] and "-m pip install -r requirements.txt" in ours[0]
    assert snapshot(store) == before


def test_an_unreachable_hub_is_found_once_and_fast_and_every_fetch_is_named(store):
    """Without HF_HUB_OFFLINE and with the hub unreachable (HF_ENDPOINT on a closed port), a
    hub model set used to retry each call for ~30 s and name the first model only, with a
    command the pinned huggingface_hub does not ship (huggingface-cli)."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(UNLIB_STORE=str(store), HF_ENDPOINT="http://127.0.0.1:9")
    command = [sys.executable, "-m", "tasks", "analyze", "--scheduler", "local", "--models", "stanford-gpt2-small",
               "--checkpoint", "1000", "--n-tokens", "10000000"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Retry" not in proc.stderr, proc.stderr
    models = resolve_model_set("stanford-gpt2-small").models
    fetches = [f"`hf download {m.source} --revision checkpoint-1000`" for m in models]
    assert all(fetch in lines[0] for fetch in fetches) and "`hf download --repo-type dataset NeelNanda/pile-10k`" \
        in lines[0] and "huggingface-cli" not in lines[0], lines[0]
    plan = subprocess.run([sys.executable, "-m", "tasks", "plan", "--models", "stanford-gpt2-small"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0 and "Retry" not in plan.stdout + plan.stderr, plan.stderr
