"""Every run parameter, described once: its name, type, default (or the model set's own), Make
variable, command-line flag, one-line help, which outputs a value changes, which commands take
it, and the function that refuses a bad value. The command line, the Makefile (which hands its
variables over with `--from-make`), the Python API (RunConfig's fields), the Luigi tasks'
parameters and docs/reference.md's table of variables all follow from PARAMETERS."""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable

from unlib import UserError
from unlib.ablation import ABLATION_CONTROLS, ABLATIONS
from unlib.activations import cache_bytes, choose_feed
from unlib.engine.halves import HALF_BLOCK_ROWS
from unlib.engine.memory import ModelFeed, ModelFootprint, default_memory_budget, parse_bytes
from unlib.engine.planning import WorkPlan
from unlib.engine.precision import check_precision, default_precision
from unlib.dataset import OFFLINE_CORPUS, check_dataset, parse_dataset
from unlib.hub import dataset_download, fetch_advice
from unlib.exclusion import exclusion_ids, parse_exclusion
from unlib.tokens import DEFAULT_N_TOKENS
from unlib import checkpoints
from unlib.model_loading import (HubUnreachable, check_same_tokenizer, check_weights, load_tokenizer, max_context,
                                 mlp_shape, model_footprint, planned_footprint, resolve_device)
from unlib.model_sets import ModelError, ModelSet, resolve_model_set
from unlib.store import Store, check_store

RUN_COMMANDS = ("analyze", "report", "plan", "compare")
ONE_RUN = ("analyze", "report", "plan")  # the commands that analyse one checkpoint
EXECUTING = ("analyze", "report", "compare")  # the commands that run the graph
QUICK_TOKENS = 4096  # QUICK=1: the smoke run's N_TOKENS
TRUE, FALSE = ("1", "yes", "true", "on"), ("0", "no", "false", "off", "")


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One run parameter. `changes` names the outputs a value changes ("" for none: it only
    changes how the run executes, so it names no file and no Luigi task); `default` is the
    value when unset, None where the help says what unset means (for `set_default` ones, the
    model set's own, unlib.model_sets.SetDefaults, which the run resolves like `resolved` ones)."""

    name: str
    kind: type
    default: Any
    help: str
    changes: str
    commands: tuple[str, ...] = RUN_COMMANDS
    set_default: bool = False
    check: Callable[[Any, "Resolution"], Any] | None = None
    resolved: bool = False  # the run resolves an unset value before building tasks (device, memory, ...)

    @property
    def make_variable(self) -> str:
        return self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str) -> Any:
        """A command-line or Make value as this parameter's type; empty (or `none`) is unset."""
        text = text.strip()
        if self.kind is bool:
            if text.lower() not in TRUE + FALSE:
                raise UserError(f"{self.make_variable}={text!r} must be 1 (yes) or 0 (no)")
            return text.lower() in TRUE
        if text in ("", "none", "None"):
            return None
        if self.kind in (int, float):
            try:
                return self.kind(text)
            except ValueError:
                what = "an integer" if self.kind is int else "a number"
                raise UserError(f"{self.make_variable} must be {what}, not {text!r}") from None
        return text


@dataclasses.dataclass
class Resolution:
    """What resolving a run's parameters has found so far: the values checked (by name), the
    model set, the reference models' indices and the correlation's plan (a WorkPlan, for its memory budget).
    `planning` (make plan): from the models' shapes only, nothing read from the store or the
    weights, and a GPU may be on another machine."""

    values: dict[str, Any]
    store_root: Path
    planning: bool = False
    model_set: ModelSet | None = None
    references: list[int] = dataclasses.field(default_factory=list)
    feed: tuple[bool, str] | None = None  # (from activation caches?, why), as CACHE decides
    caches_bytes: int = 0  # the activation caches of every model
    free_disk: int = 0  # under the store
    work_plan: WorkPlan | None = None
    given_dataset: str | None = None  # DATASET as given (checked after the models)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def memory_budget(self) -> int:
        return self.work_plan.memory_budget

    def layer_sizes(self) -> list[list[int]]:
        return [[d] * n for n, d in (shape for shape, _ in self.footprints())]

    def footprints(self) -> list[tuple[tuple[int, int], ModelFootprint]]:
        """Per model, (mlp_shape, model_footprint); in planning, a hub set's published shape
        where its config is not at hand."""
        ms = self.model_set
        if self.planning:
            return [planned_footprint(ms, m, self.checkpoint) for m in ms.models]
        return [(mlp_shape(m, self.checkpoint), model_footprint(m, self.checkpoint)) for m in ms.models]


# ---- one check per parameter, in PARAMETERS order (each may use the values before it) -----
def check_models(value: str, run: Resolution) -> str:
    run.model_set = resolve_model_set(value, run.store_root)
    return value


def check_checkpoint(value: int | None, run: Resolution) -> int | None:
    """Unset: the final weights, as the step they are where every model's is known and the same
    (a zoo's last step), so they share the explicit step's files instead of computing them again."""
    if value is None and len(finals := {checkpoints.final_step(spec) for spec in run.model_set.models}) == 1:
        value = finals.pop()
    if not run.planning:
        unreachable = []
        for spec in run.model_set.models:
            checkpoints.check_checkpoint(spec, value)
            try:
                mlp_shape(spec, value)  # reads each config now, so an unreachable model fails before any work
            except HubUnreachable as exc:
                unreachable.append(exc)
                continue
            check_weights(spec, value)  # a local folder's weights files: their headers, not the tensors
        if unreachable:
            raise ModelError(fetch_everything(unreachable, run))
    return value


def fetch_everything(unreachable: list[HubUnreachable], run: Resolution) -> str:
    """One line for models the hub cannot give: which, and every command that fetches what the
    run needs (the models at their revisions, and a hub dataset)."""
    commands = [exc.command for exc in unreachable]
    dataset = parse_dataset(run.given_dataset or run.model_set.defaults.dataset)
    if not dataset.files and dataset.name != OFFLINE_CORPUS:
        commands.append(dataset_download(dataset.name))
    names = ", ".join(exc.model for exc in unreachable)
    return (f"cannot load model{'s' if len(unreachable) > 1 else ''} {names}: not in the local Hugging Face cache "
            f"and the hub cannot be reached; {fetch_advice(commands)}, or pass local folders")


def check_checkpoints(value: str, run: Resolution) -> str:
    """CHECKPOINTS as the sorted training steps make compare analyses (each is then checked as
    CHECKPOINT is)."""
    try:
        steps = sorted({int(s) for s in value.replace(",", " ").split()})
    except ValueError:
        raise UserError(f"CHECKPOINTS={value!r} must be training steps separated by spaces, e.g. "
                        f"\"100 250 500 1000\"") from None
    if len(steps) < 2:
        raise UserError(f"CHECKPOINTS={value!r} needs at least two different training steps to compare")
    return " ".join(map(str, steps))


def check_reference(value: str | int, run: Resolution) -> str | int:
    """REFERENCE (an index, a model name or 'all'): run.references are the reference models' indices."""
    names = [m.name for m in run.model_set.models]
    if str(value) == "all":
        run.references = list(range(len(names)))
    elif isinstance(value, str) and not value.isdigit():
        if value not in names:
            raise ModelError(f"REFERENCE={value!r} is not one of the models: {', '.join(names)}, or 'all'")
        run.references = [names.index(value)]
    elif not 0 <= int(value) < len(names):
        raise ModelError(f"REFERENCE={value} is out of range: the set has {len(names)} models (0-{len(names) - 1})")
    else:
        run.references = [int(value)]
    return value


def check_ctx_len(value: int | None, run: Resolution) -> int:
    """Unset: the model set's own, capped at the models' maximum context (in planning, where
    a hub model's config is not at hand, not capped)."""
    def limit(spec):
        try:
            return max_context(spec)
        except ModelError:
            if run.planning:
                return None
            raise
    limits = [(spec, limit(spec)) for spec in run.model_set.models]
    if value is None:
        return min([run.model_set.defaults.ctx_len] + [c for _, c in limits if c is not None])
    for spec, longest in limits:
        if longest is not None and value > longest:
            raise ValueError(f"CTX_LEN={value} is longer than model {spec.name} takes ({longest} tokens); "
                             f"use CTX_LEN={longest} or less")
    if value < 2:
        raise ValueError(f"CTX_LEN={value} is too small: sequences need BOS plus at least one token")
    return value


def check_n_tokens(value: int, run: Resolution) -> int:
    """QUICK=1 makes the default a smoke run's 4,096 tokens."""
    if run.quick and value == DEFAULT_N_TOKENS:
        value = QUICK_TOKENS
    if value < 2 * HALF_BLOCK_ROWS:  # the split-half error needs thousands of tokens in each half
        raise ValueError(f"N_TOKENS={value} is too small: use at least {2 * HALF_BLOCK_ROWS} tokens, for the "
                         f"split-half error (the default is {DEFAULT_N_TOKENS})")
    return value


def check_rotations(value: int, run: Resolution) -> int:
    if value < 1:
        raise ValueError(f"ROTATIONS={value} must be at least 1")
    return value


def check_threshold(value: float | None, run: Resolution) -> float | None:
    """The model set's own threshold given explicitly counts as unset: the same run, the same folder."""
    if value is not None and not -1.0 <= value <= 1.0:
        raise ValueError(f"THRESHOLD={value} is outside [-1, 1]: excess correlations are differences of correlations")
    return None if value == run.model_set.defaults.threshold else value


def check_top_k(value: int | None, run: Resolution) -> int | None:
    if value is None:
        return value
    if value < 1:
        raise ValueError(f"TOP_K={value} must be a positive number of neurons")
    if not run.planning:  # refused rather than clamped: selecting every neuron is no selection
        for ref in run.references:
            spec = run.model_set.models[ref]
            n_layers, d_mlp = mlp_shape(spec, run.checkpoint)
            if value > n_layers * d_mlp:
                raise ValueError(f"TOP_K={value} is more than the {n_layers * d_mlp} neurons of the reference model "
                                 f"{spec.name} ({n_layers} layer{'s' if n_layers != 1 else ''} of {d_mlp}); use at "
                                 f"most {n_layers * d_mlp}, or THRESHOLD instead")
    return value


def check_ablation(value: str, run: Resolution) -> str:
    value = (value or ABLATIONS[0]).strip().lower()  # ABLATION= (empty) is the default, as in make
    if value not in ABLATIONS:
        raise ValueError(f"ABLATION={value!r} must be mean (an ablated neuron's activation becomes its mean) or "
                         f"zero (it becomes 0)")
    return value


def check_ablation_tokens(value: int | None, run: Resolution) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"ABLATION_TOKENS={value} must be a positive number of held-out tokens "
                         f"(leave it unset for a fifth of N_TOKENS)")
    if (run.n_tokens // 5 if value is None else value) < 1:
        raise ValueError(f"N_TOKENS={run.n_tokens} leaves no held-out tokens for the ablation: set ABLATION_TOKENS")
    return None if value == run.n_tokens // 5 else value  # the default given explicitly: the same folder


def check_ablation_control(value: str, run: Resolution) -> str:
    value = (value or ABLATION_CONTROLS[0]).strip().lower()
    if value not in ABLATION_CONTROLS:
        raise ValueError(f"ABLATION_CONTROL={value!r} must be matched (random neurons of the same layer and "
                         f"activation-frequency decile) or layer (random neurons of the same layer)")
    return value


def check_ablation_samples(value: int, run: Resolution) -> int:
    if value < 1:
        raise ValueError(f"ABLATION_SAMPLES={value} must be at least 1 random neuron set")
    return value


def check_device(value: str, run: Resolution) -> str:
    text = str(value).strip().lower()
    if run.planning and re.fullmatch(r"cuda(:\d+)?", text):  # make plan: a GPU elsewhere is fine
        return text
    return resolve_device(value)


def check_precision_value(value: str | None, run: Resolution) -> str | None:
    """Unset stays unset: the device's default (unlib.engine.precision.default_precision), and
    so does the device's default given explicitly (it names no folder of its own)."""
    if value is None:
        return None
    value = value.strip().lower()
    check_precision(value, run.values["device"])
    return None if value == default_precision(run.values["device"]) else value


def check_workers(value: int, run: Resolution | None = None) -> int:
    """Refuse a number of Luigi workers below one (no worker would ever run a task)."""
    if not isinstance(value, int) or value < 1:
        raise UserError(f"WORKERS={value} must be at least 1 (the number of Luigi worker processes)")
    return value


def check_parallel(value: int | None, run: Resolution) -> int:
    """Unset: one correlation block per worker that can run at the same time, on the CPU every
    worker, on CUDA as many as there are GPUs (blocks that would wait for the same GPU would
    only read the activations more often)."""
    if value is None:
        if run.device == "cuda":
            import torch

            value = max(1, min(run.workers, torch.cuda.device_count()))  # NVML: no CUDA context before the fork
        else:
            value = 1 if run.device.startswith("cuda:") else run.workers
    if value < 1:
        raise ValueError(f"PARALLEL={value} must be at least 1 (the correlation blocks to split the work into)")
    return value


def check_corr_memory(value: str | None, run: Resolution) -> str:
    """Unset: the default budget of one correlation block (on the CPU, the RAM's share of each
    worker), resolved once here so that every worker and process plans the same blocks. A
    budget too small for the engine's smallest unit of work is refused (MemoryBudgetError)."""
    if not value:
        budget = default_memory_budget(run.device, run.workers)
    else:
        try:
            budget = parse_bytes(value)
        except (ValueError, OverflowError):
            raise ValueError(f"CORR_MEMORY={value!r} is not a size: use e.g. 8G, 512M or a number of bytes") from None
    feed = None if run.feed[0] else ModelFeed(tuple(f for _, f in run.footprints()), run.ctx_len)
    run.work_plan = WorkPlan(run.layer_sizes(), run.references, run.rotations, run.device, budget, feed=feed,
                             n_tokens=run.n_tokens, precision=run.values["precision"] or default_precision(run.device))
    return str(budget)


def check_batch_size(value: int, run: Resolution) -> int:
    if value < 1:
        raise ValueError(f"BATCH_SIZE={value} must be a positive number of sequences")
    return value


def check_cache(value: str, run: Resolution) -> str:
    """Also refuses a run whose files will not fit the free disk, before any work starts: the
    activation caches count when they are forced (CACHE=1); under CACHE=auto the run streams
    instead of caching when they do not fit."""
    if value not in ("auto", "0", "1"):
        raise ValueError(f"CACHE={value!r} must be 1 (cache activations), 0 (run the models instead) or auto")
    existing, free = Store(run.store_root).free_disk()
    run.caches_bytes = cache_bytes(run.n_tokens, [shape for shape, _ in run.footprints()])
    run.feed, run.free_disk = choose_feed(value, run.caches_bytes, free), free
    if run.planning:
        return value
    needed = 4 * run.n_tokens + 2**20 * 64  # token file, results and small per-layer files
    what = "token file and results"
    if value == "1":
        needed += run.caches_bytes
        what = "activation caches (CACHE=1), token file and results"
    if needed > free:
        hint = ", or use CACHE=auto / CACHE=0 to run the models instead of caching" if value == "1" else ""
        raise UserError(f"not enough free disk for this run: its {what} need about {needed / 2**30:,.1f} GiB but "
                        f"{free / 2**30:,.1f} GiB are free under {existing}; free space, point UNLIB_STORE at a "
                        f"larger disk, or lower N_TOKENS{hint}")
    return value


def check_exclude_tokens(value: str | None, run: Resolution) -> str:
    """Unset: the model set's own; the names normalised (`none` when nothing is excluded). A
    token string the tokenizer does not know is refused now (after checking that the models
    share one tokenizer)."""
    value = ",".join(parse_exclusion(run.model_set.defaults.exclude_tokens if value is None else value)) or "none"
    if not run.planning and run.model_set.zoo is None:
        check_same_tokenizer(run.model_set.models)
        exclusion_ids(value, load_tokenizer(run.model_set, run.store_root))
    return value


def check_dataset_value(value: str | None, run: Resolution) -> str:
    """Unset: the model set's own; checked after the models, since a set's default dataset may be a hub one."""
    value = run.model_set.defaults.dataset if value is None else value
    if not run.planning:
        check_dataset(value)
    return value


def check_scheduler(value: str, run: Resolution) -> str:
    if value not in ("auto", "local", "central"):
        raise UserError(f"SCHEDULER={value!r} must be auto, local or central")
    return value


def check_port(value: int, run: Resolution) -> int:
    if not 0 < value < 65536:
        raise UserError(f"SCHEDULER_PORT={value} is not a TCP port (1-65535)")
    return value


def check_scheduler_gpus(value: int | None, run: Resolution) -> int | None:
    if value is not None and value < 1:
        raise UserError(f"SCHEDULER_GPUS={value} must be at least 1 (GPU tasks would never run)")
    return value


# ---- the parameters, in the order they are checked and documented --------------------------
RESULTS = "the results folder's files"
PARAMETERS: tuple[Parameter, ...] = (
    Parameter("models", str, "toy-zoo", "a model set (toy-zoo, toy-zoo-mini, stanford-gpt2-small, pythia-160m, ...) "
              "or comma-separated Hugging Face names and local folders", "everything", check=check_models),
    Parameter("checkpoint", int, None, "the training step analysed; unset: the final weights (their step where "
              "known: a zoo's last)", "everything",
              commands=ONE_RUN, check=check_checkpoint),
    Parameter("checkpoints", str, "100 250 500 1000", "the training steps make compare analyses and compares",
              "the comparison", commands=("compare",), check=check_checkpoints),
    Parameter("reference", str, 0, "the reference model: an index, a name, or all (every model, one "
              "correlation pass)", RESULTS, check=check_reference),
    Parameter("ctx_len", int, None, "tokens per sequence; unset: the model set's, capped at the models' context",
              "tokens and everything after", set_default=True, check=check_ctx_len),
    Parameter("quick", bool, False, f"a smoke run: N_TOKENS={QUICK_TOKENS:,} unless N_TOKENS is given", "",
              check=None),
    Parameter("n_tokens", int, DEFAULT_N_TOKENS, "analysed (kept) token positions", "tokens and everything after",
              check=check_n_tokens),
    Parameter("rotations", int, 5, "random rotations of the baseline", "correlations and everything after",
              check=check_rotations),
    Parameter("rotation_seed", int, 0, "seed of the random rotations", "correlations and everything after"),
    Parameter("threshold", float, None, "excess correlation a universal neuron exceeds; unset: the model set's",
              RESULTS, check=check_threshold),
    Parameter("top_k", int, None, "select the k highest excess correlations instead of a threshold", RESULTS,
              check=check_top_k),
    Parameter("ablation", str, ABLATIONS[0], "an ablated neuron's activation becomes its mean or zero",
              "ablation files", check=check_ablation),
    Parameter("ablation_tokens", int, None, "held-out tokens of the ablation; unset: a fifth of N_TOKENS",
              "ablation files", check=check_ablation_tokens),
    Parameter("ablation_samples", int, 99, "random neuron sets matched to the universal set (p can reach 0.01)",
              "ablation files", check=check_ablation_samples),
    Parameter("ablation_control", str, ABLATION_CONTROLS[0], "random sets matched to the universal set per layer "
              "and activation-frequency decile, dead neurons only when no live one is left (matched), or per layer "
              "only (layer)",
              "ablation files", check=check_ablation_control),
    Parameter("ablation_seed", int, 0,
              "seed of the random neuron sets (the ablation's and the causal checks' controls)", "ablation files"),
    Parameter("device", str, "auto", "auto (cuda when there is a GPU), cpu, cuda, cuda:N or mps", "",
              resolved=True, check=check_device),
    Parameter("precision", str, None, "the correlation's matrix products: fp32, tf32, bf16 or bf16x3 (operands "
              "rounded, sums in float32; measured errors in docs/performance.md); unset: the device's fastest within "
              "1e-3 of float64 (bf16 on a CPU with AMX, tf32 on a GPU, else fp32)", "correlations and everything after",
              check=check_precision_value),
    Parameter("workers", int, min(2, os.cpu_count() or 1), "Luigi worker processes", "", check=check_workers),
    Parameter("parallel", int, None, "correlation blocks to split the work into, at least; unset: one per worker "
              "(per GPU on cuda)", "", resolved=True, check=check_parallel),
    Parameter("batch_size", int, 32, "sequences per forward pass while caching activations (without caches, "
              "a correlation chunk's worth)", "", check=check_batch_size),
    Parameter("cache", str, "auto", "activation caches: 1 (cache), 0 (run the models instead) or auto (cache when "
              "they fit the disk)", "", check=check_cache),
    Parameter("corr_memory", str, None, "memory budget of one correlation block, e.g. 8G; unset: half the free RAM "
              "per worker, 80 % of the GPU's free memory", "", resolved=True, check=check_corr_memory),
    Parameter("exclude_tokens", str, None, "tokens whose positions are dropped (bos, eos, pad, newline or token "
              "strings); unset: the model set's", "tokens and everything after", set_default=True,
              check=check_exclude_tokens),
    Parameter("dataset", str, None, "local files, a Hugging Face dataset name[:config][@split], or python-stdlib; "
              "unset: the model set's", "tokens and everything after", set_default=True, check=check_dataset_value),
    Parameter("scheduler", str, "auto", "auto (this store's luigid when it runs, else local), local or central", "",
              commands=EXECUTING, check=check_scheduler),
    Parameter("scheduler_port", int, 8082, "the port of this store's luigid; unset: the port it was started on "
              "(make analyze), else 8082", "",
              commands=(*EXECUTING, "scheduler"), check=check_port),
    Parameter("scheduler_host", str, "127.0.0.1", "the address luigid listens on; one other hosts reach to share it",
              "", commands=("scheduler",)),
    Parameter("scheduler_gpus", int, None, "GPUs all hosts' workers share; unset: this host's, at least 1", "",
              commands=("scheduler",), check=check_scheduler_gpus),
    Parameter("confirm", bool, False, "make clean-store removes the files it lists", "", commands=("clean-store",)),
)
BY_NAME = {p.name: p for p in PARAMETERS}
COMMANDS = (*RUN_COMMANDS, "scheduler", "clean-store")

RunConfig = dataclasses.make_dataclass(
    "RunConfig", [(p.name, p.kind if p.default is not None else p.kind | None, dataclasses.field(default=p.default))
                  for p in PARAMETERS], frozen=True)
RunConfig.__doc__ = ("The values of every run parameter (PARAMETERS; unset ones at their defaults): what the "
                     "command line builds from its options and the Python API from its keyword arguments.")
RunConfig.__module__ = __name__


def resolve(config: RunConfig, planning: bool = False, only: tuple[str, ...] | None = None) -> Resolution:
    """Check every parameter in PARAMETERS order (a ValueError of one line for a bad one) and
    fill in the defaults that follow from others (the model set's, the device's, ...).
    `planning` (make plan) resolves only what the correlation's plan needs, from the models'
    shapes: nothing is read from the store. `only`: check just these (the scheduler's)."""
    names = only or (PLAN_PARAMETERS if planning else [p.name for p in PARAMETERS])
    run = Resolution({}, Store().root, planning or only is not None, given_dataset=config.dataset)
    if not run.planning:
        check_store(run.store_root)
    for name in (p.name for p in PARAMETERS):
        value = getattr(config, name)
        check = BY_NAME[name].check
        run.values[name] = check(value, run) if check is not None and name in names else value
    return run


# make plan: the correlation's parameters only (the rest keep their given values, unchecked)
PLAN_PARAMETERS = ("models", "checkpoint", "reference", "ctx_len", "quick", "n_tokens", "rotations", "device",
                   "precision", "workers", "parallel", "cache", "corr_memory")


# what only the ablation reads: a change moves its files (and the report, run.json), not the others
ABLATION_SETTINGS = tuple(p.name for p in PARAMETERS if p.changes == "ablation files")


def folder_defaults(model_set: ModelSet) -> dict[str, Any]:
    """The default of every parameter that changes outputs (the model set's, where it has its
    own): a run's results folder is named by those that differ (unlib.store.Store.results)."""
    return {p.name: getattr(model_set.defaults, p.name) if p.set_default else p.default for p in PARAMETERS
            if p.changes and p.name not in ("models", "checkpoint", "checkpoints")}


def variables_table() -> str:
    """The Markdown table of every Make variable that docs/reference.md shows."""
    rows = ["| Variable | Default | Commands | Changes | Meaning |", "|---|---|---|---|---|"]
    for p in PARAMETERS:
        default = "the model set's" if p.set_default else "unset" if p.default is None else f"`{p.default:d}`" \
            if p.kind is bool else f"`{p.default}`"
        if p.name == "workers":
            default = "`2` (1 on one core)"
        rows.append(f"| `{p.make_variable}` | {default} | {', '.join(p.commands)} | {p.changes or 'nothing (how it runs)'} | "
                    f"{p.help} |")
    return "\n".join(rows)


def write_variables_table(path: Path) -> None:
    """Put variables_table() between the markers of `path` (docs/reference.md)."""
    text = path.read_text()
    start = text.index("-->", text.index("<!-- BEGIN run variables")) + 3
    end = text.index("<!-- END run variables -->")
    path.write_text(text[:start] + "\n" + variables_table() + "\n" + text[end:])


if __name__ == "__main__":
    write_variables_table(Path(__file__).parent.parent / "docs" / "reference.md")
