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
from tasks.common import BATCH_SIZE, DEFAULTS, EXECUTION_DEFAULTS, LUIGI_CFG, store
from tasks.common import logger as pipeline_logger
from unlib import UserError
from unlib.ablation import ABLATIONS
from unlib.activations import cache_bytes
from unlib.checkpoints import check_checkpoint
from unlib.correlation import HALF_BLOCK_ROWS, ExcessCorrelationEngine, default_memory_budget, parse_bytes
from unlib.dataset import TOKEN_IDS, check_dataset, check_token_ids
from unlib.exclusion import exclusion_ids, parse_exclusion
from unlib.model_loading import (check_same_tokenizer, check_weights, load_tokenizer, max_context, mlp_shape,
                                 planned_shape, resolve_device)
from unlib.model_sets import ModelError, resolve_model_set
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


def build_analyses(models: str = DEFAULTS["models"], checkpoint: int | None = None,
                   dataset: str | None = None, n_tokens: int = DEFAULTS["n_tokens"],
                   ctx_len: int | None = None, reference: str | int = DEFAULTS["reference"],
                   rotations: int = DEFAULTS["rotations"], rotation_seed: int = DEFAULTS["rotation_seed"],
                   threshold: float | None = None, top_k: int | None = None,
                   device: str = EXECUTION_DEFAULTS["device"], cache: str = EXECUTION_DEFAULTS["cache"],
                   memory: str = "", exclude_tokens: str | None = None,
                   batch_size: int = BATCH_SIZE, ablation: str = DEFAULTS["ablation"],
                   ablation_tokens: int | None = None, ablation_samples: int = DEFAULTS["ablation_samples"],
                   workers: int = EXECUTION_DEFAULTS["workers"],
                   parallel: int | None = None) -> list[UniversalNeuronsAnalysis]:
    """Validate the parameters (raising ValueError with a one-line message) and return the
    root task of the analysis: one per reference model ("all" scores every model of the
    set in the same correlation pass). dataset, ctx_len and exclude_tokens default to the
    model set's own (ctx_len capped at the models' maximum context); ablation_tokens to a
    fifth of n_tokens. The ablation parameters name the run (they are run parameters) and
    are used by the report's ablation (tasks.ablation.Ablation). The correlation is split
    into at least `parallel` blocks (default `workers`); an empty `memory` becomes the
    default budget of one block (on the CPU, the RAM's share of each of `workers`), resolved
    here once so that every worker and process plans the same blocks."""
    check_store(store().root)
    model_set = resolve_model_set(models, store().root)
    defaults = model_set.defaults
    dataset = defaults.dataset if dataset in (None, "") else dataset
    exclude_tokens = ",".join(parse_exclusion(defaults.exclude_tokens if exclude_tokens in (None, "")
                                              else exclude_tokens)) or "none"
    names = [m.name for m in model_set.models]
    references = parse_references(reference, names)
    for spec in model_set.models:
        check_checkpoint(spec, checkpoint)
        mlp_shape(spec, checkpoint)  # reads each config now, so an unreachable model fails before any work
        check_weights(spec, checkpoint)  # a local folder's weights files: their headers, not the tensors
    if ctx_len is None:
        ctx_len = min([defaults.ctx_len] + [c for c in map(max_context, model_set.models) if c is not None])
    for spec in model_set.models:
        longest = max_context(spec)
        if longest is not None and ctx_len > longest:
            raise ValueError(f"CTX_LEN={ctx_len} is longer than model {spec.name} takes ({longest} tokens); "
                             f"use CTX_LEN={longest} or less")
    if ctx_len < 2:
        raise ValueError(f"CTX_LEN={ctx_len} is too small: sequences need BOS plus at least one token")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"THRESHOLD={threshold} is outside [-1, 1]: excess correlations are differences of correlations")
    if top_k is not None and top_k < 1:
        raise ValueError(f"TOP_K={top_k} must be a positive number of neurons")
    if top_k is not None:  # refused rather than clamped: selecting every neuron is no selection
        for ref in references:
            n_layers, d_mlp = mlp_shape(model_set.models[ref], checkpoint)
            if top_k > n_layers * d_mlp:
                raise ValueError(f"TOP_K={top_k} is more than the {n_layers * d_mlp} neurons of the reference model "
                                 f"{names[ref]} ({n_layers} layer{'s' if n_layers != 1 else ''} of {d_mlp}); use at most {n_layers * d_mlp}, "
                                 f"or THRESHOLD instead")
    device = resolve_device(device)
    parallel, budget = correlation_settings(n_tokens, rotations, parallel, memory, device, workers)
    memory = str(budget)
    ablation = (ablation or DEFAULTS["ablation"]).strip().lower()  # ABLATION= (empty) is the default, as in make
    if ablation not in ABLATIONS:
        raise ValueError(f"ABLATION={ablation!r} must be mean (an ablated neuron's activation becomes its mean) or "
                         f"zero (it becomes 0)")
    if ablation_tokens is not None and ablation_tokens < 1:
        raise ValueError(f"ABLATION_TOKENS={ablation_tokens} must be a positive number of held-out tokens "
                         f"(leave it unset for a fifth of N_TOKENS)")
    if (n_tokens // 5 if ablation_tokens is None else ablation_tokens) < 1:
        raise ValueError(f"N_TOKENS={n_tokens} leaves no held-out tokens for the ablation: set ABLATION_TOKENS")
    if ablation_samples < 1:
        raise ValueError(f"ABLATION_SAMPLES={ablation_samples} must be at least 1 random neuron set")
    if batch_size < 1:
        raise ValueError(f"BATCH_SIZE={batch_size} must be a positive number of sequences")
    if cache not in ("auto", "0", "1"):
        raise ValueError(f"CACHE={cache!r} must be 1 (cache activations), 0 (run the models instead) or auto")
    sizes = [[d] * n for n, d in (mlp_shape(m, checkpoint) for m in model_set.models)]
    ExcessCorrelationEngine(sizes, references, rotations, rotation_seed, device, budget)  # plans
    if model_set.zoo is None:  # the models first: a set's default dataset may be a hub one
        check_same_tokenizer(model_set.models)
        exclusion_ids(exclude_tokens, load_tokenizer(model_set, store().root))  # a bad token string fails now
    check_dataset(dataset)
    check_disk(model_set, checkpoint, n_tokens, cache)
    return [UniversalNeuronsAnalysis(models=models, checkpoint=checkpoint, dataset=dataset, n_tokens=n_tokens,
                                     ctx_len=ctx_len, exclude_tokens=exclude_tokens, reference=ref, rotations=rotations, rotation_seed=rotation_seed,
                                     threshold=threshold, top_k=top_k, device=device, cache=cache, memory=memory,
                                     batch_size=batch_size, all_references=len(references) > 1, ablation=ablation,
                                     ablation_tokens=ablation_tokens, ablation_samples=ablation_samples,
                                     parallel=parallel)
            for ref in references]


def default_parallel(device: str, workers: int) -> int:
    """PARALLEL's default: one correlation block per worker that can run one at the same time,
    on the CPU every worker, on CUDA as many as there are GPUs (blocks that would wait for the
    same GPU would only read the activations more often)."""
    if device == "cuda":
        return max(1, min(workers, torch.cuda.device_count()))  # NVML: no CUDA context before the fork
    return 1 if device.startswith("cuda:") else workers


def parse_references(reference: str | int, names: list[str]) -> list[int]:
    """REFERENCE (an index, a model name or 'all') as the indices of the reference models."""
    if str(reference) == "all":
        return list(range(len(names)))
    if isinstance(reference, str) and not reference.isdigit():
        if reference not in names:
            raise ModelError(f"REFERENCE={reference!r} is not one of the models: {', '.join(names)}, or 'all'")
        return [names.index(reference)]
    if not 0 <= int(reference) < len(names):
        raise ModelError(f"REFERENCE={reference} is out of range: the set has {len(names)} models (0-{len(names) - 1})")
    return [int(reference)]


def plan_correlation(models: str = DEFAULTS["models"], checkpoint: int | None = None,
                     n_tokens: int = DEFAULTS["n_tokens"], reference: str | int = DEFAULTS["reference"],
                     rotations: int = DEFAULTS["rotations"], device: str = EXECUTION_DEFAULTS["device"],
                     memory: str = "", workers: int = EXECUTION_DEFAULTS["workers"],
                     parallel: int | None = None) -> tuple[list[str], CorrelationPlan]:
    """(the model names, the plan of their correlation) as `analyze` with these parameters would
    run it, from the models' shapes alone: no weights are loaded and the store is neither read
    nor written. The device need not be here: DEVICE=cuda plans for a GPU (then give its
    budget, CORR_MEMORY, unless nvidia-smi can read it)."""
    check_workers(workers)
    model_set = resolve_model_set(models, store().root)
    names = [m.name for m in model_set.models]
    references = parse_references(reference, names)
    text = str(device).strip().lower()
    device = text if re.fullmatch(r"cuda(:\d+)?", text) else resolve_device(device)  # a GPU elsewhere is fine
    parallel, budget = correlation_settings(n_tokens, rotations, parallel, memory, device, workers)
    sizes = [[d] * n for n, d in (planned_shape(model_set, m, checkpoint) for m in model_set.models)]
    engine = ExcessCorrelationEngine(sizes, references, rotations, 0, device, budget)
    return names, CorrelationPlan(engine, n_tokens, parallel)


def correlation_settings(n_tokens: int, rotations: int, parallel: int | None, memory: str, device: str,
                         workers: int) -> tuple[int, int]:
    """N_TOKENS, ROTATIONS, PARALLEL and CORR_MEMORY checked (a ValueError of one line for a
    bad one): (the correlation blocks, default_parallel; the budget of one in bytes, default
    default_memory_budget)."""
    if n_tokens < 2 * HALF_BLOCK_ROWS:  # the split-half error needs a block of tokens in each half
        raise ValueError(f"N_TOKENS={n_tokens} is too small: use at least {2 * HALF_BLOCK_ROWS} tokens, two blocks of "
                         f"{HALF_BLOCK_ROWS} for the split-half error (the default is {DEFAULTS['n_tokens']})")
    if rotations < 1:
        raise ValueError(f"ROTATIONS={rotations} must be at least 1")
    parallel = default_parallel(device, workers) if parallel is None else parallel
    if parallel < 1:
        raise ValueError(f"PARALLEL={parallel} must be at least 1 (the correlation blocks to split the work into)")
    if not memory:
        return parallel, default_memory_budget(device, workers)
    try:
        return parallel, parse_bytes(memory)
    except (ValueError, OverflowError):
        raise ValueError(f"CORR_MEMORY={memory!r} is not a size: use e.g. 8G, 512M or a number of bytes") from None


def check_store(root: str | Path) -> None:
    """Refuse a store (UNLIB_STORE, default ./store) that is not a writable folder, or that
    cannot be created, before any work starts."""
    root = Path(root)
    fix = "point UNLIB_STORE at a folder you can write (it is created if missing)"
    if root.exists():
        if not root.is_dir():
            raise UserError(f"the store {root} (UNLIB_STORE) is a file, not a folder; {fix}")
        if not os.access(root, os.W_OK | os.X_OK):
            raise UserError(f"the store {root} (UNLIB_STORE) is not writable (read-only file system or "
                            f"permissions); {fix}")
        return
    parent = next(p for p in root.absolute().parents if p.exists())
    if not parent.is_dir():
        raise UserError(f"the store {root} (UNLIB_STORE) cannot be created: {parent} is a file, not a folder; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"the store {root} (UNLIB_STORE) cannot be created: {parent} is not writable; {fix}")


def check_workers(workers) -> None:
    """Refuse a number of Luigi workers below one (no worker would ever run a task)."""
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"WORKERS={workers} must be at least 1 (the number of Luigi worker processes)")


def check_disk(model_set, checkpoint: int | None, n_tokens: int, cache: str) -> None:
    """Refuse a run whose files will not fit the free disk, before any work starts. The
    activation caches count when they are forced (CACHE=1); under CACHE=auto the run
    streams instead of caching when they do not fit."""
    existing, free = store().free_disk()
    needed = 4 * n_tokens + 2**20 * 64  # token file, results and small per-layer files
    what = "token file and results"
    if cache == "1":
        needed += cache_bytes(n_tokens, [mlp_shape(m, checkpoint) for m in model_set.models])
        what = "activation caches (CACHE=1), token file and results"
    if needed > free:
        hint = ", or use CACHE=auto / CACHE=0 to run the models instead of caching" if cache == "1" else ""
        raise UserError(f"not enough free disk for this run: its {what} need about {needed / 2**30:,.1f} GiB but "
                        f"{free / 2**30:,.1f} GiB are free under {existing}; free space, point UNLIB_STORE at a "
                        f"larger disk, or lower N_TOKENS{hint}")


@dataclasses.dataclass
class RunReport:
    """What one `run_analysis` call did: seconds, and the task ids it ran itself, found
    already complete, or saw run by another worker (another process sharing the scheduler)."""

    seconds: float
    ran_here: list[str]
    already_done: list[str]
    run_by_other_worker: list[str]


RETRIES = 2


def token_tasks(roots: list[luigi.Task]) -> list[luigi.Task]:
    """The token files the graph under `roots` reads (the analysed tokens and the ablation's
    held-out ones), found by walking its requirements."""
    from tasks.data import TokenizeDataset

    found, seen, todo = {}, set(), list(roots)
    while todo:
        task = todo.pop()
        if task.task_id in seen:
            continue
        seen.add(task.task_id)
        if isinstance(task, TokenizeDataset):
            found[task.task_id] = task
        else:
            todo.extend(luigi.task.flatten(task.requires()))
    return list(found.values())


def run_analysis(roots: list[luigi.Task], workers: int = EXECUTION_DEFAULTS["workers"],
                 central: tuple[str, int] | None = None, wait_seconds: float = 2.0) -> RunReport:
    """Run the graph under `roots` (run_graph), its token files first: a dataset too short for
    the held-out tokens, say, then stops the run before any model runs."""
    first = run_graph(token_tasks(roots), workers, central, wait_seconds)
    rest = run_graph(roots, workers, central, wait_seconds)
    ran = sorted(set(first.ran_here) | set(rest.ran_here))
    return RunReport(first.seconds + rest.seconds, ran, sorted(set(rest.already_done) - set(ran)),
                     sorted(set(first.run_by_other_worker) | set(rest.run_by_other_worker)))


def run_graph(roots: list[luigi.Task], workers: int = EXECUTION_DEFAULTS["workers"],
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
    """The run's tables: excess, pairwise, stats, universal, layer_summary."""
    d = root.results_dir()
    out = {"excess": pd.read_csv(d / "excess_correlation_scores.csv"),
           "pairwise": pd.read_csv(d / "pairwise_correlations.csv"),
           "stats": pd.read_csv(d / "neuron_stats.csv"),
           "universal": pd.read_csv(d / "universal_neurons.csv")}
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


def run_universal_neurons_analysis(model_names: str | list[str] = DEFAULTS["models"], dataset_path=None,
                                   checkpoint_value: int | None = None, excess_threshold: float | None = None,
                                   top_k: int | None = None, n_rotation_samples: int = DEFAULTS["rotations"],
                                   n_tokens: int = DEFAULTS["n_tokens"], ctx_len: int | None = None,
                                   reference: str | int = DEFAULTS["reference"],
                                   device: str = EXECUTION_DEFAULTS["device"], batch_size: int = BATCH_SIZE,
                                   workers: int = EXECUTION_DEFAULTS["workers"], store_dir: str | None = None,
                                   exclude_tokens: str | None = None) -> dict:
    """Build and run the analysis graph (Luigi, local scheduler) and return its tables as
    DataFrames: excess, pairwise, stats, universal, layer_summary. With reference="all",
    returns {model name: tables} for every model of the set.

    model_names: a model set name or a list of Hugging Face names and local folders.
    dataset_path: a DATASET value (local files, a Hugging Face dataset `name[:config][@split]`,
    python-stdlib) or token ids (see dataset_value); it, ctx_len and exclude_tokens default
    to the model set's own. batch_size: sequences per forward pass. store_dir sets
    $UNLIB_STORE. Prints nothing: warnings go to loggers (quiet_run)."""
    if store_dir is not None:
        os.environ["UNLIB_STORE"] = str(Path(store_dir).expanduser().absolute())
    models = model_names if isinstance(model_names, str) else ",".join(map(str, model_names))
    check_workers(workers)
    with quiet_run():
        roots = build_analyses(models, checkpoint_value, dataset=dataset_value(dataset_path), n_tokens=n_tokens,
                               ctx_len=ctx_len, reference=reference, rotations=n_rotation_samples,
                               threshold=excess_threshold, top_k=top_k, device=device, exclude_tokens=exclude_tokens,
                               batch_size=batch_size, workers=workers)
        run_analysis(roots, workers=workers)
    if str(reference) == "all":
        return {root.model_set.models[root.reference].name: read_results(root) for root in roots}
    return read_results(roots[0])
