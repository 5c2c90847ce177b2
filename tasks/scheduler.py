"""Start and stop the Luigi central scheduler (luigid) in the background, with its state,
pid file and logs under the store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.common import LUIGI_CFG, store

REPO = Path(__file__).resolve().parent.parent


def scheduler_dir() -> Path:
    return store().root / "scheduler"


def answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a luigid answers on host:port."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/api/task_list?data={{}}", timeout=1):
            return True
    except OSError:
        return False


def start(port: int) -> str:
    """Start luigid on 127.0.0.1:port unless one answers there already; returns a status line."""
    if answers(port):
        return f"luigid already answers on http://127.0.0.1:{port}"
    d = scheduler_dir().resolve()
    (d / "logs").mkdir(parents=True, exist_ok=True)
    # luigid reads its [scheduler] settings (retry and disconnect delays) from luigi.cfg
    # (tasks/luigi.cfg links to it, so an installed copy has it too).
    env = {**os.environ, "LUIGI_CONFIG_PATH": str(LUIGI_CFG)}
    subprocess.run([sys.executable, "-c", "from luigi.cmdline import luigid; luigid()", "--background",
                    "--address", "127.0.0.1", "--port", str(port), "--pidfile", str(d / "luigid.pid"),
                    "--logdir", str(d / "logs"), "--state-path", str(d / "state.pickle")],
                   check=True, cwd=REPO, env=env)
    for _ in range(100):
        if answers(port):
            return f"luigid on http://127.0.0.1:{port} (pid {(d / 'luigid.pid').read_text().strip()}, logs in {d / 'logs'})"
        time.sleep(0.1)
    raise RuntimeError(f"luigid did not answer on port {port}; see {d / 'logs'}")


def stop() -> str:
    pid_file = scheduler_dir() / "luigid.pid"
    if not pid_file.exists():
        return f"no luigid pid file in {scheduler_dir()}"
    pid = int(pid_file.read_text().strip())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    pid_file.unlink()
    return f"luigid (pid {pid}) stopped"
