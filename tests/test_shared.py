"""A shared machine: SCHEDULER=auto/central use only the luigid started for this store, a
scheduler that goes away mid-run does not lose the run, concurrent runs on one store never
set aside each other's files, and WORKERS=N gives each worker its share of the cores."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import luigi
import pytest
import torch

from conftest import analyzed_store
from test_production import REPO, analyze, api, env_for, free_port, start_analyze, wait_for

MODELS = "toy-zoo-mini"
ARGS = ["--models", MODELS, "--checkpoint", "300", "--n-tokens", "8192", "--device", "cpu"]
RESULTS = Path("results") / MODELS / "checkpoint-300_n_tokens-8192"
CSVS = ["excess_correlation_scores.csv", "pairwise_correlations.csv", "neuron_stats.csv", "universal_neurons.csv"]


def scheduler(store: Path, action: str, port: int | None = None, *options: str) -> subprocess.CompletedProcess:
    """`python -m tasks scheduler <action>` for the store, on `port`, with further options."""
    port_args = [] if port is None else ["--scheduler-port", str(port)]
    return subprocess.run([sys.executable, "-m", "tasks", "scheduler", action, *port_args, *options], cwd=REPO,
                          env=env_for(store), capture_output=True, text=True, timeout=60)


def same_results(store: Path, reference: Path) -> bool:
    return all((store / RESULTS / n).read_bytes() == (reference / RESULTS / n).read_bytes() for n in CSVS)


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory, mini_zoo):
    """One uninterrupted run on a fresh store (local scheduler): the results to compare with."""
    return analyzed_store(tmp_path_factory, mini_zoo, "fresh", *ARGS)


@pytest.mark.slow
def test_two_concurrent_runs_on_a_fresh_store_set_nothing_aside(fresh_run, tmp_path):
    store = tmp_path / "store"
    procs = [start_analyze(store, *ARGS, "--scheduler", "local") for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "Traceback" not in out + err and "refusing" not in err, err
    assert not [p for p in store.rglob("*") if ".refused-" in p.name or ".partial" in p.name or ".tmp" in p.name]
    assert same_results(store, fresh_run)
    summaries = [out[:out.index("Finished in")] for out, _ in outputs]
    assert summaries[0] == summaries[1]


def test_a_lock_held_by_a_writer_is_not_corruption(tmp_path):
    from tasks.targets import H5Target
    from unlib.h5write import PartialH5, partial_path, write_h5
    from unlib.store import provenance

    path = tmp_path / "cache.h5"
    write_h5(path, {}, {"provenance": provenance({"a": 1})})
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, h5py
        files = [h5py.File({str(path)!r}, "a"), h5py.File({str(partial_path(path))!r}, "w")]
        print("open", flush=True)
        sys.stdin.read()""")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        assert not H5Target(path, {"a": 1}).exists()  # in use: not complete, and left alone
        with pytest.raises(BlockingIOError):  # another process's partial file is never deleted
            PartialH5(path, {"x": ((4,), "float32", (4,))}, {"provenance": provenance({"a": 1})})
    finally:
        holder.communicate("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.h5", "cache.partial.h5"]
    assert H5Target(path, {"a": 1}).exists()


def test_a_task_waits_for_another_writer_then_reuses_its_output_with_its_share_of_threads(tmp_path, monkeypatch):
    from tasks.common import PipelineTask
    from unlib.store import exclusive

    monkeypatch.setenv("UNLIB_STORE", str(tmp_path))
    monkeypatch.setenv("UNLIB_TORCH_THREADS", "1")
    target = tmp_path / "out.txt"
    seen = []

    class Write(PipelineTask):
        def output(self):
            return luigi.LocalTarget(str(target))

        def run(self):
            seen.append(torch.get_num_threads())
            target.write_text("mine")

    threads = torch.get_num_threads()
    try:
        Write().run()
        assert seen == [1] and target.read_text() == "mine"
        target.write_text("theirs")  # another process finished it while this one waited: not redone
        Write().run()
        assert seen == [1] and target.read_text() == "theirs"
    finally:
        torch.set_num_threads(threads)
    target.unlink()
    locker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from unlib.store import exclusive
        with exclusive([{str(target)!r}], {str(tmp_path / "locks")!r}):
            print("locked", flush=True)
            time.sleep(1)
            Path({str(target)!r}).write_text("theirs")""")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline() == "locked\n"
    monkeypatch.delenv("UNLIB_TORCH_THREADS")
    Write().run()  # blocks until the other process releases the lock, then finds the output there
    assert locker.wait() == 0 and target.read_text() == "theirs" and seen == [1]
    with exclusive([target], tmp_path / "locks"):  # released again
        pass


def test_a_lock_taken_on_another_host_through_another_mount_holds_here(other_host, tmp_path):
    store, target = tmp_path / "store", tmp_path / "store" / "results" / "table.csv"
    target.parent.mkdir(parents=True)
    mount = tmp_path / "mounted-elsewhere"
    locker = subprocess.Popen(other_host(store, mount, [sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from unlib.store import exclusive
        with exclusive([{str(mount / "results" / "table.csv")!r}], {str(mount / "locks")!r}):
            print("locked", flush=True)
            time.sleep(1)
            Path({str(mount / "results" / "table.csv")!r}).write_text("theirs")""")]),
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline() == "locked\n"
    from unlib.store import exclusive
    with exclusive([target], store / "locks"):  # waits for the other host's lock
        assert target.read_text() == "theirs"
    assert locker.wait() == 0


def test_another_host_is_told_in_one_line_of_a_luigid_that_listens_for_its_own_host_only(other_host, tmp_path):
    store, mount, port = tmp_path / "store", tmp_path / "mounted-elsewhere", free_port()
    assert scheduler(store, "start", port).returncode == 0  # 127.0.0.1: this host only
    try:
        host = socket.gethostname()
        there = {name: subprocess.run(other_host(store, mount, [sys.executable, "-m", "tasks", *args], own_network=True),
                                      cwd=REPO, env=env_for(mount), capture_output=True, text=True, timeout=120)
                 for name, args in [("analyze", ["analyze", *ARGS, "--scheduler", "central", "--scheduler-port", str(port)]),
                                    ("start", ["scheduler", "start", "--scheduler-port", str(port)]),
                                    ("stop", ["scheduler", "stop"])]}
        for proc in there.values():
            assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert there["analyze"].stderr.startswith(
            f"error: SCHEDULER=central but this store's luigid was started on host {host} for that host only; "
            f"start it there with SCHEDULER_HOST=<an address every host reaches> to share it")
        assert there["start"].stderr.startswith(f"error: this store's record names a luigid on host {host} "
                                                f"(127.0.0.1:{port}) that does not answer from here")
        assert there["stop"].stderr.startswith(f"error: this store's luigid runs on host {host} ")
        assert not (store / "activations").exists()
    finally:
        assert scheduler(store, "stop").stdout.startswith("luigid (pid")


def test_a_scheduler_address_or_gpu_count_that_cannot_work_is_one_line(tmp_path):
    store, port = tmp_path / "store", free_port()
    for args, error in [(["--scheduler-host", "192.0.2.123"], f"error: luigid cannot listen on 192.0.2.123:{port} ("),
                        (["--scheduler-gpus", "0"], "error: SCHEDULER_GPUS=0 must be at least 1")]:
        proc = scheduler(store, "start", port, *args)
        assert proc.returncode == 2 and proc.stderr.startswith(error) and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert not (store / "scheduler" / "scheduler.json").exists()


def test_a_run_finds_this_stores_luigid_on_the_port_it_was_started_on(mini_zoo, tmp_path):
    """`make scheduler SCHEDULER_PORT=P`, then `make analyze` without SCHEDULER_PORT: the run
    uses the luigid on P (it used to say it listens on P, not 8082, and run locally)."""
    store, port = tmp_path / "store", free_port()
    shutil.copytree(mini_zoo, store / "zoo")
    started = scheduler(store, "start", port)
    assert started.returncode == 0, started.stderr
    gpus = torch.cuda.device_count()
    assert (f"; {gpus} GPU" if gpus else "; no GPU on this host: 1 slot for CUDA tasks") in started.stdout
    try:
        proc = analyze(store, "--models", MODELS, "--checkpoint", "300", "--n-tokens", "4096", "--device", "cpu",
                       "--scheduler", "auto")
        assert proc.returncode == 0, proc.stderr
        assert f"Scheduler: central luigid on 127.0.0.1:{port}; device: cpu" in proc.stdout
    finally:
        assert scheduler(store, "stop").stdout.startswith("luigid (pid")


@pytest.mark.slow
def test_a_luigid_not_started_for_this_store_is_never_used(fresh_run, tmp_path):
    store, other = tmp_path / "store", tmp_path / "other"
    shutil.copytree(fresh_run / "zoo", store / "zoo")
    port = free_port()
    assert scheduler(other, "start", port).returncode == 0
    try:
        taken = scheduler(store, "start", port)
        assert taken.returncode == 2 and taken.stdout == ""
        assert taken.stderr.strip() == f"error: port {port} is taken by a luigid not started for this store; " \
                                       f"choose another SCHEDULER_PORT"
        central = analyze(store, *ARGS, "--scheduler", "central", "--scheduler-port", str(port))
        assert central.returncode == 2, central.stderr
        lines = central.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: SCHEDULER=central but the luigid on "
                                                       f"127.0.0.1:{port} was not started for this store")
        auto = analyze(store, *ARGS, "--scheduler", "auto", "--scheduler-port", str(port))
        assert auto.returncode == 0, auto.stderr
        assert f"Scheduler: local (the luigid on 127.0.0.1:{port} was not started for this store" in \
               " ".join(auto.stdout.split())
        assert api(port, "task_list", status="", upstream_status="", search="") == {}  # never told of a task
        assert same_results(store, fresh_run)
    finally:
        assert scheduler(other, "stop").returncode == 0


@pytest.mark.slow
def test_a_scheduler_that_goes_away_mid_run_leaves_a_finished_run_and_one_line(fresh_run, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(fresh_run / "zoo", store / "zoo")
    port = free_port()
    assert scheduler(store, "start", port).returncode == 0
    pid = int((store / "scheduler" / "luigid.pid").read_text())
    proc = start_analyze(store, *ARGS, "--scheduler", "auto", "--scheduler-port", str(port))
    try:
        assert wait_for(proc, lambda: any(store.glob("activations/**/*.h5")), timeout=600), proc.communicate()
    finally:
        os.kill(pid, signal.SIGKILL)  # the scheduler dies while the caches are being written
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"Scheduler: central luigid on 127.0.0.1:{port}" in out
    assert "Traceback" not in out + err and "Failed" not in err, err
    gone = [line for line in err.splitlines() if "went away" in line]
    assert gone == [f"WARNING: the central scheduler on 127.0.0.1:{port} went away; finishing with the local "
                    f"scheduler"], err
    assert same_results(store, fresh_run)
    again = analyze(store, *ARGS, "--scheduler", "auto", "--scheduler-port", str(port))
    assert again.returncode == 0, again.stderr
    assert "Scheduler: local (no luigid started for this store answers" in " ".join(again.stdout.split())
    assert " 0 tasks run here" in " ".join(again.stdout.split())
    assert same_results(store, fresh_run)
    assert scheduler(store, "stop").stdout.startswith("no luigid started for this store is running")
