"""What every task shares: one-line reports of user errors, a lock on its outputs, results
files sealed after they are written, and progress shown in the terminal (rich) and in the
Luigi scheduler's web UI."""
from __future__ import annotations

import logging
import os
import sys
import signal
import time
from pathlib import Path

import luigi
import luigi.rpc
from rich import get_console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from tasks.locks import one_writer
from tasks.targets import made_from
from unlib import UserError
from unlib.h5read import DamagedFile

logger = logging.getLogger("luigi-interface")
# A run's routine lines (the feed a correlation block reads and why, how fast it ran, progress
# in a file or pipe): plain lines on stderr from the command line (show_notes), not warnings;
# from Python, where the user configures logging
notes = logging.getLogger("universal_neurons")


def show_notes() -> None:
    """Print the run's routine lines on stderr as they are, for the command line (once)."""
    if notes.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    notes.addHandler(handler)
    notes.setLevel(logging.INFO)
    notes.propagate = False
# The pipeline's Luigi settings: luigi.cfg at the top of the checkout, linked into this package
# (so an installed copy finds it from any directory).
LUIGI_CFG = Path(__file__).with_name("luigi.cfg")


class PipelineTask(luigi.Task):
    """Base of every task: a UserError (bad model, dataset, ...) is reported as its one-line
    message, also to the command line via $UNLIB_ERROR_DIR, instead of a traceback. Each
    task's run() holds a lock on its outputs (see `one_writer`)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "run" in vars(cls):
            cls.run = one_writer(cls.run)

    def on_failure(self, exception):
        if isinstance(exception, UserError):
            error_dir = os.environ.get("UNLIB_ERROR_DIR")
            if error_dir:
                # a damaged input was set aside: the run retries, rebuilding it (run_analysis)
                kind = "damaged" if isinstance(exception, DamagedFile) else "txt"
                (Path(error_dir) / f"{self.task_id}.{kind}").write_text(str(exception))
            if isinstance(exception, DamagedFile):
                logger.warning("%s", exception)
            return str(exception)
        return super().on_failure(exception)


def leave_interrupts_to_the_main_process() -> None:
    """In a process forked during a run (run_graph sets $UNLIB_MAIN_PID): ignore Ctrl-C, which
    the run's main process reports in one line and answers by stopping its workers."""
    if os.environ.get("UNLIB_MAIN_PID", str(os.getpid())) != str(os.getpid()):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


os.register_at_fork(after_in_child=leave_interrupts_to_the_main_process)


class HideReportedTracebacks(logging.Filter):
    """Drops the worker's traceback log records for UserErrors (their message is reported)
    and for a central scheduler that went away (run_analysis says so in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() == "Failed pinging scheduler":
            return False
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RuntimeError) and str(error).startswith("Unfulfilled"):
            # with several workers: an input another worker found damaged and set aside after
            # this task was scheduled; that worker reports the damage in one line
            record.msg, record.args, record.exc_info = "%s: %s (set aside by another task)", (record.getMessage(),
                                                                                            error), None
            return True
        return not isinstance(error, (UserError, luigi.rpc.RPCError))


logger.addFilter(HideReportedTracebacks())


def file_identity(path: str) -> tuple[int, int, int]:
    """(inode, modification time, size): a file replaced or rewritten gets another."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


class ResultTask(PipelineTask):
    """A task writing results files: complete only when its files are sealed and every results
    task it reads from is complete too, so a deleted or damaged intermediate result (say
    neuron_stats.csv) is rebuilt, and everything made from it with it. Subclasses implement
    write(); run() writes the files, then seals them."""

    def write(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        inputs = made_from(self)
        # a file another task shares and has already made (a run differing in what it does not
        # read), which write() left as it was, keeps its seal; everything written is sealed
        kept = {t.path: file_identity(t.path) for t in luigi.task.flatten(self.output()) if t.exists()}
        self.write()
        for target in luigi.task.flatten(self.output()):
            if target.path not in kept or file_identity(target.path) != kept[target.path]:
                target.seal(inputs)

    def complete(self) -> bool:
        return super().complete() and all(t.complete() for t in luigi.task.flatten(self.requires())
                                          if isinstance(t, ResultTask))


class TaskProgress:
    """Progress of a long step: a rich bar in a terminal; elsewhere (a file, a pipe, a
    notebook) a line at each quarter done, once the step has taken PIPE_PROGRESS_AFTER
    seconds; and the task's progress percentage and status message in the scheduler UI
    (throttled to once a second, since each is an HTTP call to luigid)."""

    PIPE_PROGRESS_AFTER = 10.0

    def __init__(self, task: luigi.Task, description: str, total: int, unit: str = "tokens"):
        self.task, self.description, self.total, self.unit = task, description, total, unit
        terminal = get_console().is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed:,.0f}/{task.total:,.0f} " + unit),
                                 TimeRemainingColumn(), transient=True, disable=not terminal)
        self.bar = self.progress.add_task(description, total=total)
        self.start = self.last = time.monotonic()
        self.quarters_said = 4 if terminal else 0  # quarters done already said in a line

    def __enter__(self) -> "TaskProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, done: int, total: int | None = None, extra: str = "") -> None:
        self.progress.update(self.bar, completed=done)
        now = time.monotonic()
        rate = done / max(now - self.start, 1e-9)
        if now - self.last >= 1.0 or done >= self.total:
            self.last = now
            self.task.set_progress_percentage(round(100 * done / max(self.total, 1), 1))
            self.task.set_status_message(f"{self.description}: {done:,}/{self.total:,} {self.unit} "
                                         f"({rate:,.0f} {self.unit}/s){extra}")
        quarters = 4 * done // max(self.total, 1)
        if quarters > self.quarters_said and now - self.start >= self.PIPE_PROGRESS_AFTER:
            self.quarters_said = quarters
            left = (self.total - done) / max(rate, 1e-9)
            notes.info("%s: %s/%s %s (%d %%, %s %s/s, %.0f s left)%s", self.description, f"{done:,}",
                       f"{self.total:,}", self.unit, 25 * quarters, f"{rate:,.0f}", self.unit, left, extra)
