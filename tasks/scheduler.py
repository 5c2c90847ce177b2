"""Start and stop the Luigi central scheduler (luigid) in the background, with its state,
pid file and logs under the store, and tell this store's luigid from anyone else's.

luigid has no authentication, so `start` records in store/scheduler/scheduler.json the
port, the pid and the process's start time; a luigid counts as this store's only while the
process with that pid and start time is alive and listening on that port."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from tasks.common import LUIGI_CFG, store

REPO = Path(__file__).resolve().parent.parent


def scheduler_dir() -> Path:
    """store/scheduler/: luigid's state, pid file, logs and this store's record of it."""
    return store().root / "scheduler"


def record_path() -> Path:
    """The record `start` writes: {"port", "pid", "started"}."""
    return scheduler_dir() / "scheduler.json"


def answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a luigid answers on host:port."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/api/task_list?data={{}}", timeout=1):
            return True
    except OSError:
        return False


def recorded() -> dict | None:
    """This store's luigid as recorded by `start`, if that process still runs and listens
    on the recorded port; else None."""
    try:
        record = json.loads(record_path().read_text())
        process = psutil.Process(record["pid"])
        if abs(process.create_time() - record["started"]) > 1:
            return None  # the pid now belongs to another process
        listening = any(c.status == psutil.CONN_LISTEN and c.laddr.port == record["port"]
                        for c in process.net_connections("tcp"))
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None
    return record if listening else None


def not_ours(port: int) -> str | None:
    """Why the central scheduler on 127.0.0.1:port must not be used for this store (no
    luigid answers, or it is not the one `make scheduler` started for this store), or None."""
    record = recorded()
    if record is not None and record["port"] == port:
        return None
    if record is not None:
        return f"this store's luigid listens on port {record['port']}, not {port}"
    if answers(port):
        return f"the luigid on 127.0.0.1:{port} was not started for this store, {store().root.resolve()}"
    return f"no luigid started for this store answers on 127.0.0.1:{port}"


def start(port: int) -> tuple[int, str]:
    """Start luigid for this store on 127.0.0.1:port; returns (exit status, a status line)."""
    record = recorded()
    if record is not None:
        if record["port"] == port:
            return 0, f"this store's luigid already answers on http://127.0.0.1:{port} (pid {record['pid']})"
        return 2, (f"error: this store's luigid already runs on port {record['port']} (pid {record['pid']}); "
                   f"use SCHEDULER_PORT={record['port']}, or `make scheduler-stop` first")
    if answers(port):
        return 2, (f"error: port {port} is taken by a luigid not started for this store; "
                   f"choose another SCHEDULER_PORT")
    d = scheduler_dir().resolve()
    (d / "logs").mkdir(parents=True, exist_ok=True)
    pid_file = d / "luigid.pid"
    pid_file.unlink(missing_ok=True)  # a stale one would make luigid believe it already runs
    # luigid reads its [scheduler] settings (retry and disconnect delays) from luigi.cfg
    # (tasks/luigi.cfg links to it, so an installed copy has it too).
    env = {**os.environ, "LUIGI_CONFIG_PATH": str(LUIGI_CFG)}
    subprocess.run([sys.executable, "-c", "from luigi.cmdline import luigid; luigid()", "--background",
                    "--address", "127.0.0.1", "--port", str(port), "--pidfile", str(pid_file),
                    "--logdir", str(d / "logs"), "--state-path", str(d / "state.pickle")],
                   check=True, cwd=REPO, env=env)
    for _ in range(100):
        if answers(port) and pid_file.exists():
            pid = int(pid_file.read_text().strip())
            record_path().write_text(json.dumps({"port": port, "pid": pid,
                                                 "started": psutil.Process(pid).create_time()}))
            if recorded() is not None:
                return 0, f"luigid on http://127.0.0.1:{port} (pid {pid}, logs in {d / 'logs'})"
        time.sleep(0.1)
    raise RuntimeError(f"luigid did not answer on port {port}; see {d / 'logs'}")


def stop() -> str:
    """Stop this store's luigid (never another process that took over its pid)."""
    record = recorded()
    record_path().unlink(missing_ok=True)
    if record is None:
        return f"no luigid started for this store is running ({scheduler_dir()})"
    (scheduler_dir() / "luigid.pid").unlink(missing_ok=True)
    try:
        os.kill(record["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    return f"luigid (pid {record['pid']}) stopped"
