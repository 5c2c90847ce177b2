"""Start and stop the Luigi central scheduler (luigid) in the background, with its state,
pid file and logs under the store, and tell this store's luigid from anyone else's, from
this host or from any other host that shares the store.

luigid has no authentication, so `start` gives it a random token, which it reports among
its resources (a `store_<token>` entry no task uses), and records in
store/scheduler/scheduler.json where it listens, the token, and the host, pid and start
time of its process. A luigid counts as this store's only while it answers at the recorded
address with the recorded token; only the host that started it can stop it."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import torch

from tasks.common import LUIGI_CFG, store

REPO = Path(__file__).resolve().parent.parent
LOCAL = "127.0.0.1"


def scheduler_dir() -> Path:
    """store/scheduler/: luigid's state, pid file, logs and this store's record of it."""
    return store().root / "scheduler"


def record_path() -> Path:
    """The record `start` writes: {"host", "port", "token", "hostname", "pid", "started"}."""
    return scheduler_dir() / "scheduler.json"


def api(host: str, port: int, method: str, timeout: float = 2) -> dict | None:
    """A luigid's answer to a read-only API call (`task_list`, `resource_list`), or None
    where none answers on host:port."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/api/{method}?data={{}}", timeout=timeout) as answer:
            return json.loads(answer.read())["response"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def token_resource(token: str) -> str:
    return f"store_{token}"


def reports_token(host: str, port: int, token: str) -> bool:
    """Whether the luigid on host:port is the one started with this token."""
    resources = api(host, port, "resource_list")
    return bool(resources) and any(r.get("name") == token_resource(token) for r in resources)


def read_record() -> dict | None:
    try:
        record = json.loads(record_path().read_text())
        return record if {"host", "port", "token"} <= record.keys() else None
    except (OSError, ValueError, AttributeError):
        return None


def recorded() -> dict | None:
    """This store's luigid as recorded by `start`, if it answers at the recorded address
    with the recorded token; else None."""
    record = read_record()
    if record is not None and reports_token(record["host"], record["port"], record["token"]):
        return record
    return None


def not_ours(port: int) -> str | None:
    """Why the central scheduler on port must not be used for this store (no luigid
    answers, or it is not the one `make scheduler` started for this store), or None."""
    record = recorded()
    if record is not None and record["port"] == port:
        return None
    if record is not None:
        return f"this store's luigid listens on port {record['port']}, not {port}"
    written = read_record()
    if written is not None and written["port"] == port and written["host"] == LOCAL \
            and written.get("hostname") != socket.gethostname():
        return (f"this store's luigid was started on host {written.get('hostname')} for that host only; "
                f"start it there with SCHEDULER_HOST=<an address every host reaches> to share it")
    host = written["host"] if written is not None and written["port"] == port else LOCAL
    if api(host, port, "task_list") is not None:
        return f"the luigid on {host}:{port} was not started for this store, {store().root.resolve()}"
    return f"no luigid started for this store answers on {host}:{port}"


def client_address(listen: str) -> str:
    """The address other hosts reach a luigid on that listens on `listen`."""
    return socket.getfqdn() if listen in ("", "0.0.0.0", "::") else listen


def start(port: int, host: str = LOCAL, gpus: int | None = None) -> tuple[int, str]:
    """Start luigid for this store, listening on host:port, handing out `gpus` units of the
    `gpu` resource (default: this host's GPUs, at least 1); returns (exit status, a line)."""
    record = recorded()
    if record is not None:
        where = f"{record['host']}:{record['port']}"
        if record["port"] == port:
            return 0, f"this store's luigid already answers on http://{where} (pid {record['pid']} on {record['hostname']})"
        return 2, (f"error: this store's luigid already runs on {where} (pid {record['pid']} on {record['hostname']}); "
                   f"use SCHEDULER_PORT={record['port']}, or `make scheduler-stop` on {record['hostname']} first")
    address = client_address(host)
    if api(address, port, "task_list") is not None:
        return 2, f"error: port {port} is taken by a luigid not started for this store; choose another SCHEDULER_PORT"
    gpus = max(1, torch.cuda.device_count()) if gpus is None else gpus  # NVML: no CUDA context
    d = scheduler_dir().resolve()
    (d / "logs").mkdir(parents=True, exist_ok=True)
    pid_file = d / "luigid.pid"
    pid_file.unlink(missing_ok=True)  # a stale one would make luigid believe it already runs
    token = secrets.token_hex(8)
    # luigid reads its [scheduler] settings (retry and disconnect delays) from luigi.cfg
    # (tasks/luigi.cfg links to it, so an installed copy has it too); its resources are set
    # here, before the daemon builds its scheduler from the configuration.
    env = {**os.environ, "LUIGI_CONFIG_PATH": str(LUIGI_CFG)}
    code = ("import luigi.configuration, sys; config = luigi.configuration.get_config(); "
            f"config.set('resources', 'gpu', '{gpus}'); config.set('resources', '{token_resource(token)}', '1'); "
            "from luigi.cmdline import luigid; luigid(sys.argv[1:])")
    subprocess.run([sys.executable, "-c", code, "--background", "--address", host, "--port", str(port),
                    "--pidfile", str(pid_file), "--logdir", str(d / "logs"), "--state-path", str(d / "state.pickle")],
                   check=True, cwd=REPO, env=env)
    for _ in range(100):
        if reports_token(address, port, token) and pid_file.exists():
            pid = int(pid_file.read_text().strip())
            record_path().write_text(json.dumps({"host": address, "port": port, "token": token,
                                                 "hostname": socket.gethostname(), "pid": pid,
                                                 "started": psutil.Process(pid).create_time()}))
            return 0, (f"luigid on http://{address}:{port} (pid {pid}, {gpus} gpu, logs in {d / 'logs'})")
        time.sleep(0.1)
    raise RuntimeError(f"luigid did not answer on {address}:{port}; see {d / 'logs'}")


def stop() -> tuple[int, str]:
    """Stop this store's luigid from the host that started it (never another process that
    took over its pid); returns (exit status, a line)."""
    record = recorded()
    if record is None:
        record_path().unlink(missing_ok=True)
        return 0, f"no luigid started for this store is running ({scheduler_dir()})"
    if record["hostname"] != socket.gethostname():
        return 2, (f"error: this store's luigid runs on host {record['hostname']} (pid {record['pid']}); "
                   f"run `make scheduler-stop` there")
    record_path().unlink(missing_ok=True)
    (scheduler_dir() / "luigid.pid").unlink(missing_ok=True)
    try:
        if abs(psutil.Process(record["pid"]).create_time() - record["started"]) <= 1:
            os.kill(record["pid"], signal.SIGTERM)
    except (psutil.Error, ProcessLookupError):
        pass
    return 0, f"luigid (pid {record['pid']}) stopped"
