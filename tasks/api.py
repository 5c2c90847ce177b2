"""Run an analysis from Python (notebooks) or from the command line: validate the
parameters, build the Luigi graph, run it, and return or print the results."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import luigi
import luigi.configuration
import luigi.retcodes
import luigi.rpc
import numpy as np
import pandas as pd
import torch

from tasks.analysis import UniversalNeuronsAnalysis
from tasks.common import LUIGI_CFG
from tasks.common import logger as pipeline_logger
from tasks.correlation import Correlations
from tasks.data import TokenizeDataset
from tasks.targets import store
from unlib import UserError
from unlib.config import PARAMETERS, RunConfig, check_workers, resolve
from unlib.dataset import TOKEN_IDS, check_token_ids
from unlib.families import read_counts
from unlib.plan import CorrelationPlan
from unlib.selection import UniversalNeuronAnalyzer
from unlib.store import atomic_path

luigi.configuration.add_config_path(str(LUIGI_CFG))
# torch.cuda.is_available() (resolve_device) asks NVML instead of initialising CUDA in this
# process, which Luigi forks into workers afterwards (a forked child cannot use CUDA then).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
# Luigi reads [core] rpc_* (luigi.cfg) in its RemoteScheduler but warns that its `core` task does not.
warnings.filterwarnings("ignore", "The configuration contains the parameter 'rpc_",
                        luigi.parameter.UnconsumedParameterWarning)
logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())  # a library's records show only where the user configures logging


class AnalysisFailed(RuntimeError):
    """The Luigi run did not complete the analysis; `code` is the Luigi retcode."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def build_analyses(config: RunConfig) -> list[UniversalNeuronsAnalysis]:
    """Check the run's parameters (unlib.config.resolve: a ValueError of one line for a bad
    one) and return the root task of its analysis: one per reference model (REFERENCE=all
    scores every model of the set in the same correlation pass)."""
    run = resolve(config)
    values = {**run.values, "all_references": len(run.references) > 1,
              "corr_memory_given": config.corr_memory not in (None, "")}
    names = UniversalNeuronsAnalysis.get_param_names(include_significant=True)
    return [UniversalNeuronsAnalysis(**{**{k: v for k, v in values.items() if k in names}, "reference": ref})
            for ref in run.references]


def plan_correlation(config: RunConfig) -> tuple[list[str], CorrelationPlan]:
    """(the model names, the plan of their correlation) as `analyze` with this configuration
    would run it, from the models' shapes alone: no weights are loaded and the store is neither
    read nor written. The device need not be here: DEVICE=cuda plans for a GPU (then give its
    budget, CORR_MEMORY, unless nvidia-smi can read it)."""
    run = resolve(config, planning=True)
    plan = CorrelationPlan(run.work_plan, run.n_tokens, run.parallel, run.caches_bytes, run.free_disk, run.cache,
                           run.feed[1])
    return [m.name for m in run.model_set.models], plan


@dataclasses.dataclass
class RunReport:
    """What one `run_analysis` call did: seconds, and the task ids it ran itself, found
    already complete, or saw run by another worker (another process sharing the scheduler)."""

    seconds: float
    ran_here: list[str]
    already_done: list[str]
    run_by_other_worker: list[str]


RETRIES = 2


def graph_tasks(roots: list[luigi.Task], kind: type) -> list[luigi.Task]:
    """The tasks of type `kind` in the graph under `roots`, found by walking its requirements
    (not below them)."""
    found, seen, todo = {}, set(), list(roots)
    while todo:
        task = todo.pop()
        if task.task_id in seen:
            continue
        seen.add(task.task_id)
        if isinstance(task, kind):
            found[task.task_id] = task
        else:
            todo.extend(luigi.task.flatten(task.requires()))
    return list(found.values())


def run_analysis(roots: list[luigi.Task], workers: int = RunConfig.workers,
                 central: tuple[str, int] | None = None, wait_seconds: float = 2.0) -> RunReport:
    """Run the graph under `roots` (run_graph), its token files first (the analysed tokens and
    the ablation's held-out ones): a dataset too short for the held-out tokens, say, then stops
    the run before any model runs. Then the correlations' blocks are decided once and for all
    (Correlations.record_plan), and the rest runs."""
    first = run_graph(graph_tasks(roots, TokenizeDataset), workers, central, wait_seconds)
    for correlation in graph_tasks(roots, Correlations):
        correlation.record_plan()
    rest = run_graph(roots, workers, central, wait_seconds)
    ran = sorted(set(first.ran_here) | set(rest.ran_here))
    return RunReport(first.seconds + rest.seconds, ran, sorted(set(rest.already_done) - set(ran)),
                     sorted(set(first.run_by_other_worker) | set(rest.run_by_other_worker)))


def run_graph(roots: list[luigi.Task], workers: int = RunConfig.workers,
              central: tuple[str, int] | None = None, wait_seconds: float = 2.0) -> RunReport:
    """Run the graph until the roots are complete. Raises the task's UserError when a user
    mistake stopped it (e.g. a dataset too small), AnalysisFailed for anything else.
    `central` is the (host, port) of a central scheduler to share the work through; None
    runs Luigi's local scheduler, with one unit of `gpu` per GPU of this host.

    A Luigi worker exits once nothing is left that it can run, also while another worker
    (another process sharing the central scheduler) still runs part of the graph, or a
    dead worker's task waits to be released. So the roots' completeness is checked, and
    the build repeated while another worker holds tasks, and after a failure (RETRIES times,
    once the scheduler's retry delay has passed): a task that found an input damaged has
    set it aside, so the next build rebuilds it. A central scheduler that goes away
    mid-run is reported in one line and the run finishes with the local scheduler (the
    tasks' output locks keep it from clashing with other processes on the store). With
    several workers, each worker process runs torch on its share of the cores."""
    from luigi.execution_summary import _summary_dict

    check_workers(workers)
    start = time.monotonic()
    # the local scheduler reads its resources from the configuration (luigid gets them at start)
    luigi.configuration.get_config().set("resources", "gpu", str(max(1, torch.cuda.device_count())))
    kwargs = {"local_scheduler": True} if central is None else {"scheduler_host": central[0],
                                                                "scheduler_port": central[1]}
    retry_delay = luigi.configuration.get_config().getfloat("scheduler", "retry_delay", 3.0)
    ran, seen_done, elsewhere, retries = set(), set(), set(), RETRIES
    patience = start + 120  # seconds to wait for tasks the scheduler does not grant us
    with tempfile.TemporaryDirectory() as error_dir:
        os.environ["UNLIB_ERROR_DIR"] = error_dir  # forked workers inherit it
        os.environ["UNLIB_MAIN_PID"] = str(os.getpid())
        if workers > 1:
            os.environ["UNLIB_TORCH_THREADS"] = str(max(1, torch.get_num_threads() // workers))
            import transformer_lens.model_bridge  # noqa: F401  imported once here, not in every forked task (~5 s)
        try:
            while True:
                for earlier in Path(error_dir).glob("*.damaged"):  # rebuilt by this attempt, if it works
                    earlier.unlink()
                try:
                    result = luigi.build(roots, workers=workers, detailed_summary=True, **kwargs)
                except luigi.rpc.RPCError:  # only a central scheduler raises it
                    pipeline_logger.warning("the central scheduler on %s:%d went away; finishing with the local "
                                            "scheduler", *central)
                    kwargs = {"local_scheduler": True}
                    continue
                summary = _summary_dict(result.worker)
                ran |= {t.task_id for t in summary["completed"]}
                seen_done |= {t.task_id for t in summary["already_done"]}
                elsewhere |= {t.task_id for t in summary["run_by_other_worker"]}
                if all(root.complete() for root in roots) or summary["scheduling_error"] \
                        or any(Path(error_dir).glob("*.txt")):
                    break
                if summary["failed"]:
                    if retries == 0:
                        break
                    retries -= 1
                    time.sleep(retry_delay + 1)
                elif summary["run_by_other_worker"] or (summary["not_run"] and time.monotonic() < patience):
                    # another worker runs tasks we need, or the scheduler has not yet released a
                    # killed worker's task (worker_disconnect_delay): ask again shortly
                    time.sleep(wait_seconds)
                else:
                    break
        finally:
            del os.environ["UNLIB_ERROR_DIR"], os.environ["UNLIB_MAIN_PID"]
            os.environ.pop("UNLIB_TORCH_THREADS", None)
        user_errors = sorted({p.read_text() for p in Path(error_dir).glob("*.txt")})
        damaged = sorted(p.read_text() for p in Path(error_dir).glob("*.damaged"))  # the last attempt's
    if not all(root.complete() for root in roots):
        if user_errors:
            raise UserError(user_errors[0])
        if damaged and len(damaged) >= len(summary["failed"]):  # no other failure in the last attempt
            raise UserError(f"{damaged[0]}; run the same command again")
        raise AnalysisFailed(result.summary_text, luigi.retcodes.retcode().task_failed or 1)
    return RunReport(time.monotonic() - start, sorted(ran), sorted(seen_done - elsewhere - ran),
                     sorted(elsewhere - ran))


def read_results(root: UniversalNeuronsAnalysis) -> dict[str, pd.DataFrame]:
    """The run's tables: excess, pairwise, stats, universal, families, family_counts, layer_summary."""
    d = root.results_dir()
    out = {"excess": pd.read_csv(d / "excess_correlation_scores.csv"),
           "pairwise": pd.read_csv(d / "pairwise_correlations.csv"),
           "stats": pd.read_csv(d / "neuron_stats.csv"),
           "universal": pd.read_csv(d / "universal_neurons.csv"),
           "families": pd.read_csv(d / "families.csv"),
           "family_counts": read_counts(d / "family_counts.csv")}
    out["layer_summary"] = UniversalNeuronAnalyzer(out["excess"]).layer_summary(out["universal"])
    return out


def dataset_value(dataset_path) -> str | None:
    """The DATASET value of `dataset_path`: a path or dataset name as given (None: the model
    set's default); token ids (a list, numpy array or torch tensor; 1-D one document, 2-D one
    document per row) are saved once to store/datasets/token-ids-<hash of the ids>.npy,
    and that file is the dataset."""
    if dataset_path is None or isinstance(dataset_path, (str, os.PathLike)):
        return None if dataset_path is None else os.fspath(dataset_path)
    if hasattr(dataset_path, "detach"):  # a torch tensor
        dataset_path = dataset_path.detach().cpu().numpy()
    ids = check_token_ids(np.asarray(dataset_path), "dataset_path (a dataset path or name, or token ids)")
    digest = hashlib.sha256(f"{ids.dtype.str}{ids.shape}".encode() + np.ascontiguousarray(ids).tobytes())
    path = store().root / "datasets" / f"token-ids-{digest.hexdigest()[:16]}{TOKEN_IDS}"
    if not path.exists():
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, ids)
    return str(path)


@contextlib.contextmanager
def quiet_run():
    """How a run from Python (a notebook) reports: nothing on stdout or stderr but its errors.
    Luigi does not configure logging, so the pipeline's warnings reach only the
    `luigi-interface` logger (shown where the user configures logging, e.g.
    `logging.basicConfig()`); Python warnings raised meanwhile go to this module's logger
    (`tasks.api`); task errors print to stderr unless logging is configured."""
    config = luigi.configuration.get_config()
    if not config.has_section("core"):
        config.add_section("core")
    config.set("core", "no_configure_logging", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a forked worker would print a notice
    interface = logging.getLogger("luigi-interface")
    configured = logging.getLogger().handlers or any(
        not isinstance(h, logging.NullHandler) for h in interface.handlers)
    errors = None if configured else logging.StreamHandler(sys.stderr)
    if errors is not None:
        errors.setLevel(logging.ERROR)
        interface.addHandler(errors)
    with warnings.catch_warnings():
        warnings.showwarning = _log_warning
        try:
            yield
        finally:
            if errors is not None:
                interface.removeHandler(errors)


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logger.warning("%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())


# The three parameters the seed's function names its own way; the others go by their names
API_NAMES = {"checkpoint": "checkpoint_value", "threshold": "excess_threshold", "rotations": "n_rotation_samples"}


def api_names(message: str) -> str:
    """A refusal as a Python caller gives the values: `excess_threshold=5`, not `THRESHOLD=5`."""
    for p in sorted(PARAMETERS, key=lambda p: -len(p.make_variable)):  # N_TOKENS before TOKENS-like prefixes
        message = re.sub(rf"\b{p.make_variable}\b", API_NAMES.get(p.name, p.name), message)
    return message


def run_universal_neurons_analysis(model_names: str | list[str] | None = None, dataset_path=None,
                                   checkpoint_value: int | None = None, excess_threshold: float | None = None,
                                   n_rotation_samples: int | None = None, store_dir: str | None = None,
                                   **values) -> dict:
    """Build and run the analysis graph (Luigi, local scheduler) and return its tables as
    DataFrames: excess, pairwise, stats, universal, layer_summary. With reference="all",
    returns {model name: tables} for every model of the set.

    model_names: a model set name or a list of Hugging Face names and local folders.
    dataset_path: a DATASET value (local files, a Hugging Face dataset `name[:config][@split]`,
    python-stdlib) or token ids (see dataset_value). checkpoint_value, excess_threshold and
    n_rotation_samples are CHECKPOINT, THRESHOLD and ROTATIONS; `values` are any other run
    parameters by name (unlib.config.RunConfig: n_tokens, ctx_len, reference, top_k, device,
    workers, ...); unset ones take their defaults. store_dir sets $UNLIB_STORE. Prints
    nothing: warnings go to loggers (quiet_run)."""
    if store_dir is not None:
        os.environ["UNLIB_STORE"] = str(Path(store_dir).expanduser().absolute())
    if dataset_path is not None:
        values["dataset"] = dataset_value(dataset_path)
    if model_names is not None:
        values["models"] = model_names if isinstance(model_names, str) else ",".join(map(str, model_names))
    seed_names = {"checkpoint": checkpoint_value, "threshold": excess_threshold, "rotations": n_rotation_samples}
    values.update({k: v for k, v in seed_names.items() if v is not None})
    config = RunConfig(**values)
    with quiet_run():
        try:
            roots = build_analyses(config)
        except ValueError as exc:  # UserError and the parameter checks, which name Make's variables
            exc.args = (api_names(str(exc)),)
            raise
        run_analysis(roots, workers=config.workers)
    if str(config.reference) == "all":
        return {root.model_set.models[root.reference].name: read_results(root) for root in roots}
    return read_results(roots[0])
