"""One writer per output and one task per GPU: the locks a task's run() holds."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import socket
import time

import luigi
import torch

from tasks.targets import store
from unlib.store import exclusive, slug, write_failure


def one_writer(run):
    """Wrap a task's run(): hold an exclusive lock on each of its outputs (another process
    running the same task on this store, e.g. a second `make analyze` with the local
    scheduler, waits), skip the work when that process has finished it meanwhile, and run
    torch with this worker's share of the cores ($UNLIB_TORCH_THREADS, set by run_analysis)."""
    @functools.wraps(run)
    def locked_run(self):
        if os.environ.get("UNLIB_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["UNLIB_TORCH_THREADS"]))
        try:
            with exclusive([t.path for t in luigi.task.flatten(self.output())], store().root / "locks"):
                if not self.complete():
                    with own_gpu(self.device if getattr(self, "uses_device", False) else "cpu"):
                        return run(self)
        except OSError as exc:  # a lock file, a folder: a full or read-only store is one line too
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # (EACCES may be a read of the user's)
                raise write_failure(exc.filename or store().root, exc) from None
            raise
    return locked_run


@contextlib.contextmanager
def own_gpu(device: str):
    """On CUDA, run on a GPU that no other task on this host holds (a lock file per host and
    GPU, waiting while it is held): DEVICE=cuda:N on GPU N; DEVICE=cuda on the first free one
    of this host's GPUs, made the current device so that `cuda` means it. The scheduler's
    `gpu` units count GPUs over all hosts, so on its own it could give two tasks one card.
    Called only inside a task's run(): CUDA is never touched before Luigi forks its workers."""
    if not device.startswith("cuda"):
        yield
        return
    indices = [int(device.split(":")[1])] if ":" in device else list(range(max(1, torch.cuda.device_count())))
    lock_dir = store().root / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in indices:
            with open(lock_dir / f"gpu-{slug(socket.gethostname())}-{index}.lock", "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                if len(indices) > 1:
                    torch.cuda.set_device(index)
                yield
                return
        time.sleep(1)
