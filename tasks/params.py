"""The run parameters of the tasks, as Luigi parameters made from their one description
(unlib.config.PARAMETERS): a task declares those its outputs depend on (significant) and those
it passes on or runs with (not significant, since they change how it runs, not what it writes)."""
from __future__ import annotations

import functools

import luigi

from tasks.targets import ResultTarget, store
from unlib.config import ABLATION_SETTINGS, BY_NAME, folder_defaults
from unlib.dataset import dataset_inputs
from unlib.engine.halves import DOCUMENT_RULE
from unlib.engine.precision import default_precision
from unlib.engine.rotations import ROTATION_RULE
from unlib.model_loading import model_fingerprint
from unlib.model_sets import ZOOS, ModelSet, resolve_model_set

# The tasks whose run() computes on DEVICE (models and correlations): only they take a `gpu`
# resource and a GPU of their own; the others (tokens, merges, tables, plots) run on the CPU.
DEVICE_TASKS = ("CacheActivations", "CorrelationBlock", "NeuronStats", "NeuronFamilies", "Ablation", "Interventions",
                "RunReport")
OPTIONAL = {int: luigi.OptionalIntParameter, float: luigi.OptionalFloatParameter, str: luigi.OptionalParameter}
REQUIRED = {int: luigi.IntParameter, float: luigi.FloatParameter, str: luigi.Parameter}


def parameter(name: str) -> luigi.Parameter:
    """The Luigi parameter of the run parameter `name`: significant when it changes outputs;
    required when its default follows from other parameters (the model set's dataset, the
    device's memory budget, ...), which the run resolves before it builds any task."""
    p = BY_NAME[name]
    if p.set_default or p.resolved:
        return REQUIRED[p.kind](significant=bool(p.changes), description=p.help)
    kinds = OPTIONAL if p.default is None else REQUIRED
    return kinds[p.kind](default=p.default, significant=bool(p.changes), description=p.help)


def declaring(*names: str) -> type:
    """A mixin class whose attributes are the run parameters `names`, as Luigi parameters."""
    return type("RunParameters", (), {name: parameter(name) for name in names})


class TokenParams(declaring("models", "dataset", "n_tokens", "ctx_len", "exclude_tokens", "device", "batch_size")):

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


class CheckpointParams(TokenParams, declaring("checkpoint")):

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


# How the correlations are made where no parameter says: in the correlations' key and in the
# provenance of every result read from them, so that a change rebuilds them all
CORRELATION_METHOD = {"split_halves": DOCUMENT_RULE, "rotation_draw": ROTATION_RULE}


class CorrelationParams(CheckpointParams, declaring("rotations", "rotation_seed", "precision", "cache", "corr_memory",
                                                   "parallel")):
    # the index of the reference model in the set (REFERENCE resolved: a name or "all" is not a task's)
    reference = luigi.IntParameter(default=0, description="index of the reference model")
    all_references = luigi.BoolParameter(default=False, description="score every model in the same pass")
    # whether CORR_MEMORY was given (not measured): only a given one re-plans recorded blocks
    corr_memory_given = luigi.BoolParameter(default=False, significant=False)

    @property
    def effective_precision(self) -> str:
        """PRECISION, or the device's default where it is unset."""
        return self.precision or default_precision(self.device)

    def correlation_method(self) -> dict[str, str]:
        """How the correlations are made beyond the named parameters: the split rule and the
        products' precision (the device's default can differ between hosts of one store)."""
        return {**CORRELATION_METHOD, "precision": self.effective_precision}

    def inputs(self) -> dict[str, str]:
        return {**super().inputs(), **self.correlation_method()}


class HeldOutParams(CheckpointParams, declaring("ablation_tokens", "ablation_seed")):

    @property
    def ablation_n_tokens(self) -> int:
        """The held-out tokens the ablation is measured on: ABLATION_TOKENS, or a fifth of N_TOKENS."""
        return self.n_tokens // 5 if self.ablation_tokens is None else self.ablation_tokens


class RunParams(CorrelationParams, HeldOutParams, declaring("threshold", "top_k", "ablation", "ablation_samples",
                                                            "ablation_control")):

    @property
    def effective_threshold(self) -> float:
        return self.model_set.defaults.threshold if self.threshold is None else self.threshold

    def variant(self, ablation: bool = False) -> dict:
        """Parameters that differ from their defaults (the model set's, for the data): those the
        ablation does not read name the results folder; with `ablation`, the ablation's."""
        defaults = folder_defaults(self.model_set)
        return {k: getattr(self, k) for k in defaults
                if getattr(self, k) != defaults[k] and (k in ABLATION_SETTINGS) == ablation}

    def results_dir(self):
        """The folder of the files no ablation setting changes (universal set, tables, plots)."""
        return store().results(self.model_set.name, self.checkpoint, self.variant())

    def run_dir(self):
        """The folder of the files that read the ablation settings (ablation, report, run.json):
        the results folder, or a subfolder of it named by the ablation settings that differ."""
        return store().ablation_results(self.results_dir(), self.variant(ablation=True))

    def run_name(self) -> str:
        """The run's name as its folders give it: the results folder's, and the ablation's subfolder."""
        return str(self.run_dir().relative_to(self.results_dir().parent))

    def shared_target(self, path) -> ResultTarget:
        """A results file that does not read the ablation settings: runs differing only in them share it."""
        return self.result_target(path, ignore=ABLATION_SETTINGS)
