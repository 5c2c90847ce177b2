"""Parameters shared by the pipeline's tasks, the store they write to, and progress
reporting to both the terminal (rich) and the Luigi scheduler's web UI."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import luigi
import luigi.rpc
import torch
from rich import get_console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from unlib import UserError
from unlib.ablation import ABLATIONS
from unlib.dataset import OFFLINE_CORPUS, dataset_inputs
from unlib.h5read import DamagedFile, content_digest, h5_attribute, h5_problem
from unlib.model_loading import model_fingerprint
from unlib.model_sets import ZOOS, ModelSet, resolve_model_set
from unlib.store import (Store, exclusive, provenance, seal, seal_problem, seal_record, set_aside, slug,
                         write_failure)
from unlib.tokens import DEFAULT_N_TOKENS

logger = logging.getLogger("luigi-interface")
# The pipeline's Luigi settings: luigi.cfg at the top of the checkout, linked into this package
# (so an installed copy finds it from any directory).
LUIGI_CFG = Path(__file__).with_name("luigi.cfg")

# Defaults of the run parameters; dataset, ctx_len, exclude_tokens and threshold default to the
# model set's own (unlib.models.SetDefaults).
DEFAULTS = {"models": "toy-zoo", "n_tokens": DEFAULT_N_TOKENS, "reference": 0, "rotations": 5, "rotation_seed": 0,
            "threshold": None, "top_k": None, "ablation": "mean", "ablation_tokens": None, "ablation_samples": 20,
            "ablation_seed": 0}
SET_DEFAULTS = ("dataset", "ctx_len", "exclude_tokens")
# Defaults of how a run executes (they change no result, so they name no folder). These two
# dicts are the only place defaults are written: the command line, the Python API and the
# Makefile (whose variables are empty unless set) take them from here.
# Two workers where there are two cores: the toy zoo's seeds (each trained on one thread) and
# the models' caches and statistics then run two at a time (the cold default run: 287 s
# instead of about 7 minutes on 2 cores).
EXECUTION_DEFAULTS = {"device": "auto", "cache": "auto", "workers": min(2, os.cpu_count() or 1), "scheduler": "auto",
                      "scheduler_port": 8082, "checkpoints": "100 250 500 1000"}
# The tasks whose run() computes on DEVICE (models and correlations): only they take a `gpu`
# resource and a GPU of their own; the others (tokens, merges, tables, plots) run on the CPU.
DEVICE_TASKS = ("CacheActivations", "CorrelationBlock", "NeuronStats", "Ablation", "RunReport")
# Sequences per forward pass (BATCH_SIZE): it changes speed and memory, not results, so it
# names no file.
BATCH_SIZE = 32


def store() -> Store:
    """The store all tasks write to, at an absolute path: $UNLIB_STORE, else store/ in the
    source checkout, else ~/.cache/universal-neurons/store (unlib.store.default_root)."""
    return Store()


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


_reported: set[str] = set()


def warn_once(key: str, message: str, *args) -> None:
    """Log a warning once per process and key: complete() is asked many times per run, and
    one changed input makes every file built from it stale."""
    if key not in _reported:
        _reported.add(key)
        logger.warning(message, *args)


def warn_stale(path: str, problem: str) -> None:
    warn_once(problem, "rebuilding %s (and what else was made from the same inputs): %s", path, problem)


def made_from(task: luigi.Task) -> str:
    """The content digests of the store files a task's outputs are made from (its inputs'
    files, by path within the store), as the JSON text its outputs record."""
    root = store().root
    digests = {os.path.relpath(t.path, root): content_digest(t.path) for t in luigi.task.flatten(task.input())
               if os.path.isfile(t.path)}
    return json.dumps(digests, sort_keys=True)


def rebuilt_input(recorded: str | None) -> str | None:
    """Which input a file was made from has been rebuilt (other content) since, in words; None
    when every recorded input still holds what it held. An input no longer there (caches
    removed to free disk) invalidates nothing: it is checked again if it is rebuilt."""
    root = store().root
    for name, digest in sorted(json.loads(recorded or "{}").items()):
        try:
            found = content_digest(root / name)
        except Exception:  # noqa: BLE001  gone, or damaged: its own task sets it aside and rebuilds it when needed
            continue
        if found != digest:
            return f"{name}, which it was made from, was rebuilt since"
    return None


class H5Target(luigi.LocalTarget):
    """An HDF5 file target that exists only if it opens, its values match their checksums
    (verified whole for small files, by every read for caches), it records the expected
    provenance, and the store files it was made from still hold what they held. A file built
    from other inputs is removed and rebuilt; a damaged one is moved aside for inspection and
    rebuilt. Finished files are only ever renamed into place, so opening one here never races
    a writer."""

    def __init__(self, path, expected: dict):
        super().__init__(str(path))
        self.expected = provenance(expected)

    def exists(self) -> bool:
        if not super().exists():
            return False
        try:
            problem = h5_problem(self.path, self.expected)
            if problem is None and (rebuilt := rebuilt_input(h5_attribute(self.path, "made_from"))):
                problem = ("stale", rebuilt)
        except BlockingIOError:  # open for writing elsewhere: in use, not corrupt; never moved aside
            logger.warning("%s is open for writing in another process; not using it", self.path)
            return False
        except FileNotFoundError:  # another worker set it aside meanwhile
            return False
        if problem is None:
            return True
        kind, why = problem
        if kind == "stale":
            warn_stale(self.path, why)
            Path(self.path).unlink(missing_ok=True)
        else:
            aside = set_aside(self.path)
            logger.warning("refusing %s: %s; moved it to %s and rebuilding it", self.path, why, aside.name)
        return False


class ResultTarget(luigi.LocalTarget):
    """A results file (CSV, PNG, HTML, JSON) that exists only when its seal vouches for it:
    whole (size and checksum as written) and made from this run's inputs. Anything else
    (truncated, edited, unsealed, stale) is rebuilt."""

    def __init__(self, path, expected: dict):
        super().__init__(str(path))
        self.expected = provenance(expected)

    def exists(self) -> bool:
        if not super().exists():
            return False
        problem = seal_problem(self.path, self.expected) or rebuilt_input(seal_record(self.path).get("made_from"))
        if problem is not None:
            warn_stale(self.path, problem)
        return problem is None

    def seal(self, inputs: str) -> None:
        """Vouch for the written file, recording the content of the files it was made from (made_from)."""
        seal(self.path, self.expected, made_from=inputs)


class TokenParams:
    models = luigi.Parameter(default=DEFAULTS["models"], description="model set name or comma-separated models")
    dataset = luigi.Parameter(default=OFFLINE_CORPUS, description="DATASET: local files, name[:config][@split]")
    n_tokens = luigi.IntParameter(default=DEFAULTS["n_tokens"], description="analysed (kept) positions")
    ctx_len = luigi.IntParameter(default=64)
    exclude_tokens = luigi.Parameter(default="bos", description="EXCLUDE_TOKENS: tokens whose positions are dropped")
    device = luigi.Parameter(default="cpu", significant=False)
    batch_size = luigi.IntParameter(default=BATCH_SIZE, significant=False,
                                    description="BATCH_SIZE: sequences per forward pass")

    @property
    def uses_device(self) -> bool:
        """Whether run() computes on `device` (DEVICE_TASKS), not only on the CPU."""
        return self.get_task_family() in DEVICE_TASKS

    @property
    def resources(self) -> dict:
        """Tasks that compute on a GPU hold one unit of the scheduler's `gpu` resource (the
        local scheduler: this host's GPUs; luigid: SCHEDULER_GPUS), so workers never overload a card."""
        return {"gpu": 1} if self.uses_device and str(self.device).startswith("cuda") else {}

    @functools.cached_property
    def model_set(self) -> ModelSet:
        """The models (resolved once per task instance: Luigi asks for them on every
        completeness check)."""
        return resolve_model_set(self.models, store().root)

    def token_inputs(self) -> dict[str, str]:
        """The content the token file is made from: the dataset and the tokenizer."""
        ms = self.model_set
        tokenizer = ZOOS[ms.zoo].zoo_id if ms.zoo else model_fingerprint(ms.models[0], None, weights=False)
        return {**dataset_inputs(self.dataset), "tokenizer": tokenizer}


class CheckpointParams(TokenParams):
    checkpoint = luigi.OptionalIntParameter(default=None, description="training step; None = final weights")

    def model_inputs(self, indices: list[int] | None = None) -> dict[str, str]:
        """The weights the models (all, or those at `indices`) load, by content."""
        models = self.model_set.models
        return {f"model {models[i].name}": model_fingerprint(models[i], self.checkpoint)
                for i in (range(len(models)) if indices is None else indices)}

    def inputs(self) -> dict[str, str]:
        """Every input whose content the task's outputs depend on, by name."""
        return {**self.token_inputs(), **self.model_inputs()}

    def result_target(self, path, ignore: tuple[str, ...] = ()) -> ResultTarget:
        """A sealed results file of this task: its provenance is the task's parameters (the model
        set and dataset by content, not spelling; minus those in `ignore`, which do not change
        the file) and every input's fingerprint."""
        params = {k: v for k, v in self.to_str_params(only_significant=True).items()
                  if k not in ("models", "dataset", *ignore)}
        return ResultTarget(path, {"task": self.get_task_family(), **params, "inputs": self.inputs()})


class CorrelationParams(CheckpointParams):
    reference = luigi.IntParameter(default=DEFAULTS["reference"], description="index of the reference model")
    rotations = luigi.IntParameter(default=DEFAULTS["rotations"])
    rotation_seed = luigi.IntParameter(default=DEFAULTS["rotation_seed"])
    all_references = luigi.BoolParameter(default=False, description="score every model in the same pass")
    cache = luigi.Parameter(default="auto", significant=False, description="activation caches: 1, 0 or auto")
    memory = luigi.Parameter(default="", significant=False, description="correlation memory budget, e.g. 8G")
    parallel = luigi.IntParameter(default=1, significant=False,
                                  description="PARALLEL: correlation blocks to split the work into, at least")

    def correlations(self):
        """The correlation task this run reads. With all_references, every reference's run
        shares one task (reference 0 names it), so the pass over the tokens happens once."""
        from tasks.correlation import Correlations

        return self.clone(Correlations, reference=0) if self.all_references else self.clone(Correlations)


class RunParams(CorrelationParams):
    threshold = luigi.OptionalFloatParameter(default=None, description="None = the model set's default")
    top_k = luigi.OptionalIntParameter(default=None)
    ablation = luigi.ChoiceParameter(default=DEFAULTS["ablation"], choices=ABLATIONS,
                                     description="ABLATION: an ablated neuron's activation becomes its mean or 0")
    ablation_tokens = luigi.OptionalIntParameter(default=None, description="held-out tokens; None = n_tokens // 5")
    ablation_samples = luigi.IntParameter(default=DEFAULTS["ablation_samples"], description="random neuron sets")
    ablation_seed = luigi.IntParameter(default=DEFAULTS["ablation_seed"], description="seed of the random sets")

    @property
    def ablation_n_tokens(self) -> int:
        """The held-out tokens the ablation is measured on: ABLATION_TOKENS, or a fifth of N_TOKENS."""
        return self.n_tokens // 5 if self.ablation_tokens is None else self.ablation_tokens

    @property
    def effective_threshold(self) -> float:
        return self.model_set.defaults.threshold if self.threshold is None else self.threshold

    def variant(self) -> dict:
        """Parameters that differ from their defaults (the model set's, for the data): they
        name the results folder."""
        defaults = {**DEFAULTS, **{k: getattr(self.model_set.defaults, k) for k in SET_DEFAULTS}}
        return {k: getattr(self, k) for k in defaults if k != "models" and getattr(self, k) != defaults[k]}

    def results_dir(self):
        return store().results(self.model_set.name, self.checkpoint, self.variant())


class ResultTask(PipelineTask):
    """A task writing results files: complete only when its files are sealed and every results
    task it reads from is complete too, so a deleted or damaged intermediate result (say
    neuron_stats.csv) is rebuilt, and everything made from it with it. Subclasses implement
    write(); run() writes the files, then seals them."""

    def write(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        inputs = made_from(self)
        self.write()
        for target in luigi.task.flatten(self.output()):
            target.seal(inputs)

    def complete(self) -> bool:
        return super().complete() and all(t.complete() for t in luigi.task.flatten(self.requires())
                                          if isinstance(t, ResultTask))


class TaskProgress:
    """Progress of a long step: a rich bar in a terminal (none in a notebook or a pipe, where
    a finished bar would leave an empty line), and the task's progress percentage and
    status message in the scheduler UI (throttled to once a second, since each is an HTTP
    call to luigid)."""

    def __init__(self, task: luigi.Task, description: str, total: int, unit: str = "tokens"):
        self.task, self.description, self.total, self.unit = task, description, total, unit
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed:,.0f}/{task.total:,.0f} " + unit),
                                 TimeRemainingColumn(), transient=True, disable=not get_console().is_terminal)
        self.bar = self.progress.add_task(description, total=total)
        self.start = self.last = time.monotonic()

    def __enter__(self) -> "TaskProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, done: int, total: int | None = None, extra: str = "") -> None:
        self.progress.update(self.bar, completed=done)
        now = time.monotonic()
        if now - self.last >= 1.0 or done >= self.total:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            self.task.set_progress_percentage(round(100 * done / max(self.total, 1), 1))
            self.task.set_status_message(f"{self.description}: {done:,}/{self.total:,} {self.unit} "
                                         f"({rate:,.0f} {self.unit}/s){extra}")
