import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MINI_ZOO = "toy-zoo-mini"
TRAIN_MINI_ZOO = f"""
import luigi
from tasks.zoo import TrainToyModel
from unlib.model_sets import ZOOS
ok = luigi.build([TrainToyModel(zoo="{MINI_ZOO}", seed=s) for s in ZOOS["{MINI_ZOO}"].seeds], local_scheduler=True)
raise SystemExit(0 if ok else 1)
"""


@pytest.fixture(scope="session")
def mini_zoo(tmp_path_factory, worker_id) -> Path:
    """The mini zoo's `zoo/` folder, trained once per test session through the pipeline's own
    training tasks (once for all pytest-xdist workers: the first trains it under a file lock);
    tests copy it into their stores (copies: some damage weights) instead of training again."""
    from filelock import FileLock

    # the session's folder, which every xdist worker's own temporary folder sits in
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    store = root / "mini-zoo"
    with FileLock(str(root / "mini-zoo.lock")):
        if not (store / "trained").exists():
            proc = subprocess.run([sys.executable, "-c", TRAIN_MINI_ZOO], cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "UNLIB_STORE": str(store)}, timeout=1800)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            (store / "trained").touch()
    return store / "zoo"



# Runs a command as if on another host: its own hostname, its own process ids (it cannot see
# this host's processes), and a folder mounted at another path, sharing only the file system
# and the network with this host.
OTHER_HOST = ["--uts", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c",
              'hostname other-host && mkdir -p "$2" && mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh"]


@pytest.fixture
def other_host(tmp_path):
    """as_other_host(folder, mount, command, own_network=False): the argv that runs command as
    another host seeing `folder` at `mount` (as root, or in a user namespace where that is
    allowed), on this host's network or, with own_network, on none (so not this host's loopback).
    Skips where namespaces cannot be made (unshare)."""
    errors = []
    for unshare in (["unshare"], ["unshare", "--user", "--map-root-user"]):
        def as_other_host(folder: Path, mount: Path, command: list[str], own_network: bool = False,
                          unshare=unshare) -> list[str]:
            return [*unshare, *(["--net"] if own_network else []), *OTHER_HOST, str(folder), str(mount), *command]
        probe = subprocess.run(as_other_host(tmp_path, tmp_path / "probe", ["hostname"]), capture_output=True, text=True)
        if probe.stdout.strip() == "other-host":
            return as_other_host
        errors.append(probe.stderr.strip())
    pytest.skip(f"cannot run a process as another host here (unshare): {'; '.join(errors)}")


def analyzed_store(tmp_path_factory, mini_zoo: Path, name: str, *args: str) -> Path:
    """A new store holding a copy of the mini zoo and one finished, uninterrupted
    `python -m tasks analyze <args>` (local scheduler): the results to compare other runs with."""
    store = tmp_path_factory.mktemp(name)
    shutil.copytree(mini_zoo, store / "zoo")
    proc = subprocess.run([sys.executable, "-m", "tasks", "analyze", *args, "--scheduler", "local"], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    return store


def analyze_folders_a_and_b(root: Path, texts: list[str], *args: str) -> tuple[Path, str]:
    """`python -m tasks analyze --models root/a,root/b <args>` (local scheduler, CPU) over `texts`,
    written to root/docs.jsonl, into the store root/store; the command must succeed. Returns
    (the store, the command's stdout)."""
    dataset = root / "docs.jsonl"
    dataset.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    store = root / "store"
    env = {**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tasks", "analyze", "--scheduler", "local", "--device", "cpu",
                           "--models", f"{root / 'a'},{root / 'b'}", "--dataset", str(dataset), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return store, proc.stdout


def same_tables(ours: Path, theirs: Path) -> bool:
    """Two CSV tables equal in every value but the correlations' last printed digit: runs that
    split the work differently, or use other torch thread counts, may sum float32 in another
    order (on this project's 2-core CI machine such runs moved some correlations by 1e-6)."""
    import numpy as np
    import pandas as pd

    a, b = pd.read_csv(ours), pd.read_csv(theirs)
    numbers = a.select_dtypes("number").columns
    return list(a.columns) == list(b.columns) and a.shape == b.shape and \
        a.drop(columns=numbers).equals(b.drop(columns=numbers)) and \
        np.allclose(a[numbers].to_numpy(float), b[numbers].to_numpy(float), rtol=2e-6, atol=2e-6, equal_nan=True)


def cli_in_process(store: Path, *argv: str) -> subprocess.CompletedProcess:
    """`python -m tasks <argv>` with UNLIB_STORE=store, run in this process (no interpreter
    start, five seconds less per case): its exit status, stdout and stderr, for refusals that
    stop before any task runs. Tests that start work run the real command line instead."""
    import contextlib
    import io

    from tasks.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    before = os.environ.get("UNLIB_STORE")
    os.environ["UNLIB_STORE"] = str(store)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse's refusals
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        if before is None:
            del os.environ["UNLIB_STORE"]
        else:
            os.environ["UNLIB_STORE"] = before
    return subprocess.CompletedProcess(["python", "-m", "tasks", *argv], code, out.getvalue(), err.getvalue())
