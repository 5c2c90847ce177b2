"""Start and stop the Luigi central scheduler (luigid) in the background, with its state,
pid file and logs under the store, and tell this store's luigid from anyone else's, from
this host or from any other host that shares the store.

luigid has no authentication, so `start` gives it a random token, which it reports among
its resources (a `store_<token>` entry no task uses), and records in
store/scheduler/scheduler.json where it listens, the token, and the host, pid and start
time of its process. A luigid counts as this store's only while it answers at the recorded
address with the recorded token; only the host that started it can stop it."""
from __future__ import annotations

import ipaddress
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

from tasks.common import LUIGI_CFG
from tasks.targets import store

REPO = Path(__file__).resolve().parent.parent
LOCAL = "127.0.0.1"
WILDCARDS = ("0.0.0.0", "::")


def scheduler_dir() -> Path:
    """store/scheduler/: luigid's state, pid file, logs and this store's record of it."""
    return store().root / "scheduler"


def record_path() -> Path:
    """The record `start` writes: {"host", "port", "token", "hostname", "pid", "started"}."""
    return scheduler_dir() / "scheduler.json"


def api(host: str, port: int, method: str, timeout: float = 5) -> list | dict | None:
    """A luigid's answer to a read-only API call (`task_list`, `resource_list`), or None
    where none answers on host:port."""
    netloc = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{netloc}:{port}/api/{method}?data={{}}", timeout=timeout) as answer:
            return json.loads(answer.read())["response"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def token_resource(token: str) -> str:
    return f"store_{token}"


def reports_token(host: str, port: int, token: str) -> bool:
    """Whether the luigid on host:port is the one started with this token."""
    resources = api(host, port, "resource_list")
    return bool(resources) and any(r.get("name") == token_resource(token) for r in resources)


def read_record() -> dict:
    """The record as written (an empty dict when there is none or it does not parse; a
    record from before tokens has no host or token)."""
    try:
        record = json.loads(record_path().read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def find(port: int) -> tuple[dict | None, str | None]:
    """(this store's luigid's record, None) when it answers on `port` at its recorded address
    with its token; else (None, why the central scheduler on `port` must not be used)."""
    record = read_record()
    alive = "token" in record and reports_token(record["host"], record["port"], record["token"])
    if alive and record["port"] == port:
        return record, None
    if alive:
        return None, f"this store's luigid listens on port {record['port']}, not {port}"
    if "token" in record and record["port"] == port:
        if is_loopback(record["host"]) and record.get("hostname") != socket.gethostname():
            return None, (f"this store's luigid was started on host {record.get('hostname')} for that host only; "
                          f"start it there with SCHEDULER_HOST=<an address every host reaches> to share it")
        host = record["host"]
    else:
        host = LOCAL
    if api(host, port, "task_list") is not None:
        return None, f"the luigid on {host}:{port} was not started for this store, {store().root.resolve()}"
    return None, f"no luigid started for this store answers on {host}:{port}"


def store_port(default: int) -> int:
    """The port this store's record names (where `make scheduler` started its luigid; used when
    SCHEDULER_PORT is not given), else `default`: find() then asks it once whether it answers."""
    return read_record().get("port", default)


def recorded() -> dict | None:
    """This store's luigid's record, if it answers at the recorded address with its token."""
    record = read_record()
    return find(record["port"])[0] if "token" in record else None


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) means this host only."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def outbound_address() -> str:
    """This host's address on its outgoing interface, or its name where it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))  # UDP: picks the interface, sends nothing
            return s.getsockname()[0]
        except OSError:
            return socket.gethostname()


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
    written = read_record()
    if written.get("hostname", socket.gethostname()) != socket.gethostname():
        return 2, (f"error: this store's record names a luigid on host {written['hostname']} "
                   f"({written.get('host')}:{written.get('port')}) that does not answer from here; run "
                   f"`make scheduler-stop` there, or delete {record_path()} if that host is gone")
    here = LOCAL if host in WILDCARDS else host  # where this host reaches the luigid
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tornado does
            probe.bind((host, port))
    except OSError as exc:
        taken = api(here, port, "task_list") is not None
        if taken:
            return 2, f"error: port {port} is taken by a luigid not started for this store; choose another SCHEDULER_PORT"
        return 2, (f"error: luigid cannot listen on {host}:{port} ({exc.strerror}); use SCHEDULER_HOST=<a name or "
                   f"address of this host> (0.0.0.0: every interface) and a free SCHEDULER_PORT")
    address = outbound_address() if host in WILDCARDS else host
    here_gpus = torch.cuda.device_count()  # NVML: no CUDA context
    if gpus is not None:
        slots = f"{gpus} GPU slot{'s' if gpus != 1 else ''} for CUDA tasks (SCHEDULER_GPUS)"
    elif here_gpus:
        gpus, slots = here_gpus, f"{here_gpus} GPU{'s' if here_gpus != 1 else ''}"
    else:  # one slot, so that CUDA tasks of hosts sharing this luigid can still run
        gpus, slots = 1, "no GPU on this host: 1 slot for CUDA tasks of hosts sharing it (SCHEDULER_GPUS=N for more)"
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
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if pid_file.exists() and reports_token(here, port, token):
            pid = int(pid_file.read_text().strip())
            record_path().write_text(json.dumps({"host": address, "port": port, "token": token,
                                                 "hostname": socket.gethostname(), "pid": pid,
                                                 "started": psutil.Process(pid).create_time()}))
            line = f"luigid on http://{address}:{port} (pid {pid}; {slots}; logs in {d / 'logs'})"
            if host not in WILDCARDS and is_loopback(host) and host != LOCAL:
                line += (f"; note: {host} means this host only here ({socket.gethostbyname(host)}), so other hosts "
                         f"cannot reach it: use an address of this host they reach")
            return 0, line
        time.sleep(0.1)
    if pid_file.exists():
        os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    return 2, f"error: luigid did not answer on {address}:{port} within 20 s; see {d / 'logs'}"


def stop() -> tuple[int, str]:
    """Stop this store's luigid from the host that started it (never another process that
    took over its pid); returns (exit status, a line)."""
    record = read_record()
    if not record:
        return 0, f"no luigid started for this store is running ({scheduler_dir()})"
    if record.get("hostname", socket.gethostname()) != socket.gethostname():
        return 2, (f"error: this store's luigid runs on host {record['hostname']} (pid {record.get('pid')}); "
                   f"run `make scheduler-stop` there")
    try:
        process = psutil.Process(record["pid"])
        ours = abs(process.create_time() - record["started"]) <= 1
    except (psutil.Error, KeyError, TypeError):
        ours = False
    record_path().unlink(missing_ok=True)
    (scheduler_dir() / "luigid.pid").unlink(missing_ok=True)
    if not ours:
        return 0, f"no luigid started for this store is running ({scheduler_dir()})"
    process.terminate()
    return 0, f"luigid (pid {record['pid']}) stopped"
