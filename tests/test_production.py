"""Running like production: a real luigid, SIGKILL at several points and resume, two
workers sharing one scheduler, and bad input. Uses the small toy zoo."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from unlib.store import seal_path

from conftest import REPO, analyzed_store, cli_in_process, same_tables
MODELS = "toy-zoo-mini"
ARGS = ["--models", MODELS, "--checkpoint", "300", "--n-tokens", "40000", "--device", "cpu"]
RESULTS = Path("results") / MODELS / "checkpoint-300_n_tokens-40000"
# A shorter run for the checks that need no time to interrupt it
SMALL_ARGS = ["--models", MODELS, "--checkpoint", "300", "--n-tokens", "8192", "--device", "cpu"]
SMALL_RESULTS = Path("results") / MODELS / "checkpoint-300_n_tokens-8192"
CSVS = ["excess_correlation_scores.csv", "pairwise_correlations.csv", "neuron_stats.csv", "universal_neurons.csv"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(store: Path) -> dict:
    return {**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"}


def start_analyze(store: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tasks", "analyze", *args], cwd=REPO, env=env_for(store),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def analyze(store: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks", "analyze", *args], cwd=REPO, env=env_for(store),
                          capture_output=True, text=True, timeout=timeout)


def api(port: int, method: str, **data) -> dict:
    query = urllib.parse.urlencode({"data": json.dumps(data)})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{method}?{query}", timeout=5) as r:
        return json.loads(r.read())["response"]


@pytest.fixture
def luigid(tmp_path):
    """A real central scheduler on a free loopback port, started the way `make scheduler` does
    for the test's store (tmp_path / "store"): SCHEDULER=auto/central use only that store's."""
    port = free_port()
    store = tmp_path / "store"
    out = subprocess.run([sys.executable, "-m", "tasks", "scheduler", "start", "--scheduler-port", str(port)],
                         cwd=REPO, env=env_for(store), capture_output=True, text=True, check=True)
    assert f"127.0.0.1:{port}" in out.stdout
    yield port
    subprocess.run([sys.executable, "-m", "tasks", "scheduler", "stop"], cwd=REPO, env=env_for(store), check=True)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, mini_zoo):
    """An uninterrupted run (local scheduler) to compare interrupted ones against."""
    return analyzed_store(tmp_path_factory, mini_zoo, "reference", *ARGS)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, mini_zoo):
    """An uninterrupted run of SMALL_ARGS."""
    return analyzed_store(tmp_path_factory, mini_zoo, "small", *SMALL_ARGS)


@pytest.mark.slow
def test_run_against_luigid_reports_progress(luigid, reference_run, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference_run / "zoo", store / "zoo")  # training is tested elsewhere; keep this fast
    proc = analyze(store, *ARGS, "--scheduler", "auto", "--scheduler-port", str(luigid))
    assert proc.returncode == 0, proc.stderr
    assert f"central luigid on 127.0.0.1:{luigid}" in proc.stdout
    done = api(luigid, "task_list", status="DONE", upstream_status="", search="")
    families = {t["name"] for t in done.values()}
    assert {"UniversalNeuronsAnalysis", "Correlations", "CacheActivations", "NeuronStats"} <= families
    caches = [t for t in done.values() if t["name"] == "CacheActivations"]
    assert len(caches) == 3
    for task in caches:
        assert task["progress_percentage"] == 100
        assert "tokens/s" in (task["status_message"] or "")
    correlations = next(t for t in done.values() if t["name"] == "Correlations")
    assert "GFLOP/s" in correlations["status_message"]
    for name in CSVS:
        assert (store / RESULTS / name).read_bytes() == (reference_run / RESULTS / name).read_bytes()


def wait_for(proc: subprocess.Popen, condition, timeout: float = 300) -> bool:
    """Poll until condition() holds (True) or the process ends (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_gives_identical_results(luigid, reference_run, tmp_path):
    store = tmp_path / "store"
    zoo = lambda: list(store.glob("zoo/*/seed-*/checkpoint-*"))  # noqa: E731
    stages = {
        "training": lambda: any(p.name == "checkpoint-100" for p in zoo()),
        "caching": lambda: any(store.glob("activations/**/*.partial.h5")),
        "correlating": lambda: len(list(store.glob("activations/**/*.h5"))) == 3
                                and not any(store.glob("activations/**/*.partial.h5")),
        # once the excess scores are sealed (complete): a kill between a file and its seal
        # rightly rebuilds it, which the check below would count as recomputing
        "reporting": lambda: seal_path(store / RESULTS / "excess_correlation_scores.csv").exists(),
    }
    caught = []
    for stage, condition in stages.items():
        proc = start_analyze(store, *ARGS, "--scheduler", "central", "--scheduler-port", str(luigid))
        if wait_for(proc, condition):
            os.killpg(proc.pid, signal.SIGKILL)
            caught.append(stage)
        proc.wait()
    assert {"training", "caching"} <= set(caught), f"kills landed only in {caught}"
    partial_rows = [p for p in store.glob("activations/**/*.partial.h5")]
    finished = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file() and "partial" not in p.name
                and "scheduler" not in p.parts and not p.name.startswith(".")}
    proc = analyze(store, *ARGS, "--scheduler", "central", "--scheduler-port", str(luigid),
                   "--report-tasks", str(tmp_path / "report.json"))
    assert proc.returncode == 0, proc.stderr
    for name in CSVS:
        assert (store / RESULTS / name).read_bytes() == (reference_run / RESULTS / name).read_bytes(), name
    rewritten = [p for p, t in finished.items() if p.exists() and p.stat().st_mtime_ns != t]
    assert not rewritten, f"completed outputs were recomputed: {rewritten}"
    assert not any(store.glob("activations/**/*.partial.h5"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert not any(t.startswith("TrainToyModel") for t in report["ran_here"]) or "training" == caught[-1]
    print(f"kills landed while {caught}; partial caches resumed: {len(partial_rows)}")


@pytest.mark.slow
def test_two_workers_share_one_scheduler_without_running_a_task_twice(luigid, reference_run, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference_run / "zoo", store / "zoo")
    procs = [start_analyze(store, *ARGS, "--scheduler", "central", "--scheduler-port", str(luigid),
                           "--workers", "1", "--report-tasks", str(tmp_path / f"w{i}.json")) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    reports = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    ran = [set(r["ran_here"]) for r in reports]
    assert not ran[0] & ran[1], f"tasks run twice: {ran[0] & ran[1]}"
    assert len(ran[0] | ran[1]) >= 3 + 1 + 1 + 5  # caches, tokens, correlations, stats and reporting
    for name in CSVS:  # one worker each, so torch threads other than the reference run's
        assert same_tables(store / RESULTS / name, reference_run / RESULTS / name)


def test_truncated_or_corrupted_store_files_are_refused_and_rebuilt(small_run, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(small_run, store)
    tokens = next(store.glob("tokens/*/*.h5"))
    tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])
    cache = sorted(store.glob("activations/*/*/*.h5"))[1]
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 4096] = os.urandom(4096)  # garbage inside the data blocks
    cache.write_bytes(bytes(raw))
    shutil.rmtree(store / SMALL_RESULTS)
    shutil.rmtree(store / "correlation")
    proc = analyze(store, *SMALL_ARGS, "--scheduler", "local")
    assert "refusing" in proc.stderr and "truncated" in proc.stderr
    if proc.returncode != 0:  # the corrupted cache block is found when read: one line, set aside
        lines = proc.stderr.strip().splitlines()
        assert "is corrupted" in lines[-1] and "run the same command again" in lines[-1], proc.stderr
        assert "Traceback" not in proc.stderr
        proc = analyze(store, *SMALL_ARGS, "--scheduler", "local")
    assert proc.returncode == 0, proc.stderr
    for name in CSVS:
        assert (store / SMALL_RESULTS / name).read_bytes() == (small_run / SMALL_RESULTS / name).read_bytes()


@pytest.mark.slow
def test_a_damaged_zoo_checkpoint_is_retrained(reference_run, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference_run, store)
    weights = next(store.glob("zoo/*/seed-1/checkpoint-300/model.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-4096:] = os.urandom(4096)  # damaged weights that still load
    weights.write_bytes(bytes(raw))
    proc = analyze(store, *ARGS, "--scheduler", "local")
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint-300/model.safetensors changed since it was saved; training resumes from step 100" in proc.stderr
    assert weights.read_bytes() == next(reference_run.glob("zoo/*/seed-1/checkpoint-300/model.safetensors")).read_bytes()
    for name in CSVS:
        assert (store / RESULTS / name).read_bytes() == (reference_run / RESULTS / name).read_bytes()


def save_tiny_model(path: Path, text: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from unlib.zoo import train_tokenizer

    tokenizer = train_tokenizer([text] * 50, 300, 10**5, path)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_inner=32, n_head=2, n_positions=64, bos_token_id=0,
                               eos_token_id=0, vocab_size=len(tokenizer))).save_pretrained(str(path))


@pytest.mark.parametrize("case", ["tokenizers", "no_tokenizer", "too_few_tokens", "no_gpu", "no_disk", "no_dataset",
                                  "hub_model", "rotations", "top_k"])
def test_bad_input_one_line_nonzero_exit_store_untouched(case, mini_zoo, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(mini_zoo, store / "zoo")
    args, message = {
        "tokenizers": (["--models", f"{tmp_path}/a,{tmp_path}/b"], "different tokenizers"),
        "no_tokenizer": (["--models", f"{tmp_path}/a,{tmp_path}/bare"], f"model {tmp_path}/bare has no usable tokenizer"),
        "too_few_tokens": (["--models", MODELS, "--dataset", str(tmp_path / "tiny.txt")], "fewer than the"),
        "no_gpu": (["--models", MODELS, "--device", "cuda"], "no CUDA GPU"),
        "no_disk": (["--models", MODELS, "--n-tokens", str(10**13), "--cache", "1"], "not enough free disk"),
        "no_dataset": (["--models", MODELS, "--dataset", "no-such-org/no-such-set"], "cannot load dataset"),
        "hub_model": (["--models", "stanford-gpt2-medium", "--checkpoint", "400000"], "`hf download stanford-crfm/arwen-gpt2-medium-x21 --revision checkpoint-400000`"),
        "rotations": (["--models", MODELS, "--rotations", "0"], "ROTATIONS=0 must be at least 1"),
        "top_k": (["--models", MODELS, "--top-k", "-3"], "TOP_K=-3 must be a positive"),
    }[case]
    if case == "tokenizers":
        save_tiny_model(tmp_path / "a", "def f(x):\n    return x * 2\n")
        save_tiny_model(tmp_path / "b", "for item in items:\n    print(item)\n")
    if case == "no_tokenizer":  # a model saved without its tokenizer files
        save_tiny_model(tmp_path / "a", "def f(x):\n    return x * 2\n")
        shutil.copytree(tmp_path / "a", tmp_path / "bare", ignore=shutil.ignore_patterns("*token*", "vocab*", "merges*"))
    (tmp_path / "tiny.txt").write_text("print('hello')\n")
    def contents():  # the empty lock files a refused writer leaves in locks/ are not store contents
        return sorted((p.relative_to(store), p.stat().st_size) for p in store.rglob("*")
                      if p.relative_to(store).parts[0] != "locks")
    before = contents()
    # in this process, but one case from a fresh interpreter: the command line as typed
    run = analyze if case == "hub_model" else lambda store, *argv: cli_in_process(store, "analyze", *argv)
    proc = run(store, *args, "--scheduler", "local")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert contents() == before


def test_a_dependency_set_aside_by_another_worker_is_one_line_not_a_traceback():
    import logging

    from tasks.common import HideReportedTracebacks

    try:
        raise RuntimeError("Unfulfilled dependency at run time: CacheActivations_x")
    except RuntimeError:
        record = logging.LogRecord("luigi-interface", logging.ERROR, __file__, 1, "[pid %s] Worker %s failed    %s",
                                   (1, "w", "CorrelationBlock_y"), sys.exc_info())
    assert HideReportedTracebacks().filter(record)
    assert record.exc_info is None
    line = logging.Formatter().format(record)
    assert "\n" not in line and "Traceback" not in line
    assert "CorrelationBlock_y" in line and "CacheActivations_x" in line and "set aside" in line
