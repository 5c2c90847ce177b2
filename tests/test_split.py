"""The correlation split into blocks: one worker, three workers, two processes (on this host
and as another host) sharing one luigid and a forced multi-pass plan give the same CSVs (to the last printed digit); every correlation task
runs once, and one worker reads the caches no more often than the memory plan needs."""
import json
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tasks.scheduler import outbound_address
from test_production import REPO, env_for, free_port, luigid  # noqa: F401  (luigid: a real central scheduler)
from test_shared import scheduler
from conftest import same_tables
from unlib.engine.engine import ExcessCorrelationEngine
from unlib.engine.precision import default_precision
from unlib.model_sets import ZOOS

MODELS = "toy-zoo-mini"
N_TOKENS = 8192
ARGS = ["--models", MODELS, "--checkpoint", "300", "--n-tokens", str(N_TOKENS), "--device", "cpu"]
RESULTS = Path("results") / MODELS / "checkpoint-300_n_tokens-8192"
CSVS = ["excess_correlation_scores.csv", "pairwise_correlations.csv", "neuron_stats.csv", "universal_neurons.csv"]
ZOO = ZOOS[MODELS]
CACHES_ONCE = 4 * 8192 * len(ZOO.seeds) * ZOO.n_layers * ZOO.d_mlp  # every layer of every cache, read once
# Runs the command line in-process, each process's first correlation block waiting (up to two
# minutes) until the other process has started one too: blocks of the mini zoo take well
# under a second, so without it one process may run them all before the other asks for work.
RENDEZVOUS = """
import os, sys, time
from pathlib import Path
from tasks.correlation import CorrelationBlock
from tasks.__main__ import main
locked_run = CorrelationBlock.run
def meeting_run(self):
    here = Path(os.environ["RENDEZVOUS"])
    (here / str(os.getpid())).touch()
    end = time.monotonic() + 120
    while len(list(here.iterdir())) < 2 and time.monotonic() < end:
        time.sleep(0.2)
    return locked_run(self)
CorrelationBlock.run = meeting_run
raise SystemExit(main(sys.argv[1:]))
"""


def analyze(store: Path, *args: str, code: str | None = None, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", code, "analyze"] if code else [sys.executable, "-m", "tasks", "analyze"]
    return subprocess.Popen([*command, *ARGS, *args], cwd=REPO, env={**env_for(store), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out + err


def correlation_tasks(report: Path) -> list[str]:
    return [t for t in json.loads(report.read_text())["ran_here"] if t.startswith(("CorrelationBlock", "Correlations"))]


def run_record(store: Path) -> dict:
    return json.loads((store / RESULTS / "run.json").read_text())


def same_csvs(store: Path, reference: Path) -> bool:
    return all(same_tables(store / RESULTS / name, reference / RESULTS / name) for name in CSVS)


def inputs_of(store: Path, into: Path) -> None:
    """A store holding `store`'s zoo, tokens and activation caches, but no correlation or results."""
    for name in ("zoo", "tokens", "activations"):
        shutil.copytree(store / name, into / name)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, mini_zoo):
    store = tmp_path_factory.mktemp("one-worker")
    shutil.copytree(mini_zoo, store / "zoo")
    finish(analyze(store, "--scheduler", "local", "--workers", "1", "--report-tasks", str(store / "report.json")))
    return store


def test_one_worker_runs_one_block_and_reads_each_cache_once(one_worker):
    ran = correlation_tasks(one_worker / "report.json")
    assert len(ran) == 2 and sum(t.startswith("CorrelationBlock") for t in ran) == 1
    assert run_record(one_worker)["cache_bytes_read"] == CACHES_ONCE


def test_three_workers_split_the_correlation_with_the_same_results(one_worker, tmp_path):
    store = tmp_path / "store"
    inputs_of(one_worker, store)
    finish(analyze(store, "--scheduler", "local", "--workers", "3", "--report-tasks", str(tmp_path / "report.json")))
    ran = correlation_tasks(tmp_path / "report.json")
    assert sum(t.startswith("CorrelationBlock") for t in ran) == 3 and len(set(ran)) == len(ran) == 4
    assert same_csvs(store, one_worker)
    # each extra block reads the layers it needs once more: here 3 + 3 + 4 of the 6 layers
    assert run_record(store)["cache_bytes_read"] == CACHES_ONCE * 10 // 6


def test_two_processes_on_one_luigid_share_the_blocks(one_worker, luigid, tmp_path):  # noqa: F811
    """Started together with other PARALLEL, so other plans: the first plan recorded is the one
    both run, each block once. (One worker each: with two, one process could take every block
    before the other asked, and the test would flake on who ran what.)"""
    store = tmp_path / "store"
    inputs_of(one_worker, store)
    (tmp_path / "rendezvous").mkdir()
    procs = [analyze(store, "--scheduler", "central", "--scheduler-port", str(luigid), "--workers", "1",
                     "--parallel", str(4 - i), "--report-tasks", str(tmp_path / f"p{i}.json"), code=RENDEZVOUS,
                     env={"RENDEZVOUS": str(tmp_path / "rendezvous")})
             for i in range(2)]
    for proc in procs:
        finish(proc)
    ran = [correlation_tasks(tmp_path / f"p{i}.json") for i in range(2)]
    assert all(ran), f"a process ran no correlation task: {ran}"
    every = ran[0] + ran[1]
    (plan,) = store.glob("correlation/*/blocks/plan-ref-0.json")
    blocks = len(json.loads(plan.read_text())["groups"])
    assert blocks in (3, 4)
    assert len(every) == len(set(every)) == blocks + 1, every  # the recorded blocks and the merge, each once
    assert len(list(store.glob("correlation/*/blocks/ref-*.h5"))) == blocks
    assert same_csvs(store, one_worker)


def test_two_hosts_on_one_luigid_share_the_blocks(one_worker, other_host, tmp_path):
    store, mount = tmp_path / "store", tmp_path / "mounted-elsewhere"
    inputs_of(one_worker, store)
    port = free_port()
    started = scheduler(store, "start", port, "--scheduler-host", "0.0.0.0")
    address = outbound_address()  # every interface: the record names the one other hosts use
    try:
        assert started.returncode == 0 and f"luigid on http://{address}:{port}" in started.stdout, started.stderr
        (tmp_path / "rendezvous").mkdir()
        args = ["--scheduler", "central", "--scheduler-port", str(port), "--workers", "1", "--parallel", "4"]
        here = analyze(store, *args, "--report-tasks", str(tmp_path / "here.json"), code=RENDEZVOUS,
                       env={"RENDEZVOUS": str(tmp_path / "rendezvous")})
        there = subprocess.Popen(
            other_host(store, mount, [sys.executable, "-c", RENDEZVOUS, "analyze", *ARGS, *args,
                                         "--report-tasks", str(mount / "there.json")]),
            cwd=REPO, env={**env_for(mount), "RENDEZVOUS": str(tmp_path / "rendezvous")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for proc in (here, there):
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, out + err
            assert f"Scheduler: central luigid on {address}:{port}" in out
        ran = [correlation_tasks(tmp_path / "here.json"), correlation_tasks(store / "there.json")]
        assert all(ran), f"a host ran no correlation task: {ran}"
        assert len(ran[0] + ran[1]) == len(set(ran[0] + ran[1])) == 5  # four blocks and the merge, each once
        assert same_csvs(store, one_worker)
        with urllib.request.urlopen(f"http://{address}:{port}/api/worker_list?data={{}}", timeout=5) as answer:
            hosts = {w.get("host") for w in json.loads(answer.read())["response"]}
        assert {socket.gethostname(), "other-host"} <= hosts
        elsewhere = subprocess.run(other_host(store, mount, [sys.executable, "-m", "tasks", "scheduler", "stop"]),
                                   cwd=REPO, env=env_for(mount), capture_output=True, text=True)
        assert elsewhere.returncode == 2 and elsewhere.stderr.strip() == \
            f"error: this store's luigid runs on host {socket.gethostname()} " \
            f"(pid {json.loads((store / 'scheduler' / 'scheduler.json').read_text())['pid']}); " \
            f"run `make scheduler-stop` there"
    finally:
        assert scheduler(store, "stop").returncode == 0


def test_a_multi_pass_plan_gives_the_single_pass_results(one_worker, tmp_path):
    store = tmp_path / "store"
    inputs_of(one_worker, store)
    sizes = [[ZOO.d_mlp] * ZOO.n_layers] * len(ZOO.seeds)
    mode = default_precision("cpu")  # the pipeline's products, whose operands the plan counts
    roomy = ExcessCorrelationEngine(sizes, [0], 5, 0, "cpu", 2**30, n_tokens=N_TOKENS, precision=mode)
    budget = roomy.least_memory()  # one row layer a pass
    assert len(ExcessCorrelationEngine(sizes, [0], 5, 0, "cpu", budget, n_tokens=N_TOKENS, precision=mode).passes) == 4
    finish(analyze(store, "--scheduler", "local", "--workers", "1", "--corr-memory", str(budget),
                   "--report-tasks", str(tmp_path / "report.json")))
    assert sum(t.startswith("CorrelationBlock") for t in correlation_tasks(tmp_path / "report.json")) == 4
    assert same_csvs(store, one_worker)
    assert run_record(store)["cache_bytes_read"] == CACHES_ONCE * 12 // 6  # 4 passes x 3 layers


def rerun_the_correlation(store: Path, report: Path, *args: str) -> tuple[list[str], str]:
    """Run the analysis on `store` with its merged correlations and results removed (as if
    stopped before the merge): (the kinds of correlation task it ran, its stderr)."""
    shutil.rmtree(store / "results", ignore_errors=True)
    for made in store.glob("correlation/*/*/*"):  # the merged correlations and the tables made from them
        if made.is_file() and made.parent.name != "blocks":
            made.unlink()
    proc = analyze(store, "--scheduler", "local", *args, "--report-tasks", str(report))
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out + err
    return [t.split("_")[0] for t in correlation_tasks(report)], err


@pytest.fixture(scope="module")
def three_blocks(one_worker, tmp_path_factory):
    """A store whose correlation was split into three blocks (PARALLEL=3), which it recorded."""
    store = tmp_path_factory.mktemp("three-blocks")
    inputs_of(one_worker, store)
    ran, _ = rerun_the_correlation(store, store / "report.json", "--workers", "1", "--parallel", "3")
    assert ran.count("CorrelationBlock") == 3
    return store


def test_a_resume_adopts_the_recorded_blocks_whatever_its_workers_or_parallel(three_blocks, one_worker, tmp_path):
    """A later run of the same correlation with other WORKERS and PARALLEL (and so another
    default memory budget) adopts the recorded blocks: no block runs twice."""
    store = tmp_path / "store"
    shutil.copytree(three_blocks, store)
    (plan,) = store.glob("correlation/*/blocks/plan-ref-0.json")
    recorded = json.loads(plan.read_text())
    assert len(recorded["groups"]) == 3 and recorded["parallel"] == 3
    ran, _ = rerun_the_correlation(store, tmp_path / "report.json", "--workers", "2")
    assert ran == ["Correlations"], ran  # the three finished blocks adopted, none redone
    assert json.loads(plan.read_text()) == recorded and same_csvs(store, one_worker)


@pytest.mark.slow
def test_an_explicit_corr_memory_too_small_for_the_recorded_blocks_plans_anew(three_blocks, one_worker, tmp_path):
    """Only a CORR_MEMORY given explicitly that cannot hold a recorded block plans anew, says so
    in one line, and keeps the finished blocks whose units the new plan has again."""
    store = tmp_path / "store"
    shutil.copytree(three_blocks, store)
    (plan,) = store.glob("correlation/*/blocks/plan-ref-0.json")
    recorded = json.loads(plan.read_text())
    sizes = [[ZOO.d_mlp] * ZOO.n_layers] * len(ZOO.seeds)
    budget = ExcessCorrelationEngine(sizes, [0], 5, 0, "cpu", 2**30, n_tokens=N_TOKENS,
                                     precision=default_precision("cpu")).least_memory()  # a row layer a pass
    ran, err = rerun_the_correlation(store, tmp_path / "report.json", "--workers", "1", "--corr-memory", str(budget))
    replanned = json.loads(plan.read_text())["groups"]
    kept = set(replanned) & set(recorded["groups"])  # a finished block of the same units is not redone
    assert len(replanned) == 4 and len(kept) == 2 and ran.count("CorrelationBlock") == 4 - len(kept)
    assert f"CORR_MEMORY={budget} cannot hold the blocks recorded for this correlation: planning them anew" in err
    assert same_csvs(store, one_worker)
