"""Model sets, checkpoints, and loading models through TransformerLens's TransformerBridge.

A model set is a named group of different-seed models: the built-in toy zoo, the Stanford
CRFM GPT-2 seeds, the Pythia-160m seeds, or any comma-separated list of Hugging Face names
and local `save_pretrained` folders (optionally holding `checkpoint-<step>` or `step<N>`
subfolders). Hub sets, checkpoint schedules and revision names are TransformerLens's own.
"""
from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import functools
import logging
import os
import re
from pathlib import Path

import torch

from unlib import UserError
from unlib.dataset import OFFLINE_CORPUS, PILE_SAMPLE
from unlib.store import file_fingerprint, short_hash, slug
from unlib.zoo import TRAINING_STATE, ZooConfig, quiet_transformers

ZOOS = {
    "toy-zoo": ZooConfig(name="toy-zoo"),
    # A smaller zoo for tests and quick experiments: three seeds, one minute to train.
    "toy-zoo-mini": ZooConfig(name="toy-zoo-mini", seeds=(0, 1, 2), d_model=32, d_mlp=64,
                              steps=300, save_steps=(0, 100, 300),
                              tokenizer_train_chars=1_000_000, training_tokens=300_000),
}
PAPER_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class SetDefaults:
    """What a model set analyses unless told otherwise: the dataset (DATASET syntax),
    the context length (capped at the models' own maximum), the excluded tokens
    (EXCLUDE_TOKENS syntax) and the universality threshold."""

    dataset: str
    ctx_len: int
    exclude_tokens: str
    threshold: float


# The paper's setup: 512-token contexts of Pile text without BOS/EOS/pad and newline positions.
PAPER_DEFAULTS = SetDefaults(dataset=PILE_SAMPLE, ctx_len=512, exclude_tokens="bos,eos,pad,newline",
                             threshold=PAPER_THRESHOLD)
# The toy zoo: its held-out offline corpus, its own context, its document separators (BOS)
# excluded; its small models reach lower excess correlations than GPT-2, hence lower thresholds.
ZOO_DEFAULTS = {"toy-zoo": SetDefaults(OFFLINE_CORPUS, 64, "bos", 0.3),
                "toy-zoo-mini": SetDefaults(OFFLINE_CORPUS, 64, "bos", 0.1)}

# The paper's seed sets, as patterns over TransformerLens's supported models: five Stanford CRFM
# GPT-2 seeds of each size (x21 ... x777, in that order), and Pythia-160m with its seed1-3 reruns.
HUB_SETS = {"stanford-gpt2-small": r"stanford-crfm/\w+-gpt2-small-x\d+",
            "stanford-gpt2-medium": r"stanford-crfm/\w+-gpt2-medium-x\d+",
            "pythia-160m": r"EleutherAI/pythia-160m(-seed\d+)?"}
# (n_layers, d_mlp) of each HUB_SETS set, from the models' published configs: `make plan`
# sizes a run of them without the configs at hand.
HUB_SHAPES = {"stanford-gpt2-small": (12, 3072), "stanford-gpt2-medium": (24, 4096), "pythia-160m": (12, 3072)}


def hub_set(name: str) -> list[str]:
    """The hub models of a HUB_SETS set, from TransformerLens's list of supported models."""
    from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES

    models = [m for m in OFFICIAL_MODEL_NAMES if re.fullmatch(HUB_SETS[name], m)]
    seed = lambda m: int(re.search(r"(\d+)$", m).group(1)) if re.search(r"-(x|seed)\d+$", m) else 0  # noqa: E731
    return sorted(models, key=seed)


class ModelError(UserError):
    """A model, model set or checkpoint that cannot be used."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of a set: `source` is a Hugging Face name or a local folder."""

    name: str
    source: str
    zoo: str | None = None
    seed: int | None = None

    @property
    def model_id(self) -> str:
        """Name used for this model's files in the store."""
        if self.zoo is not None:
            return f"{ZOOS[self.zoo].zoo_id}--seed-{self.seed}"
        if os.path.isdir(self.source):
            return f"{slug(Path(self.source).name)}-{short_hash(str(Path(self.source).resolve()))}"
        return slug(self.source)


@dataclasses.dataclass(frozen=True)
class ModelSet:
    name: str
    models: tuple[ModelSpec, ...]
    defaults: SetDefaults = PAPER_DEFAULTS

    @property
    def zoo(self) -> str | None:
        return self.models[0].zoo


def resolve_model_set(models: str, store_root: str | Path | None = None) -> ModelSet:
    """Expand a MODELS value (a set name or a comma-separated list) into a ModelSet (a toy
    zoo's models are in the store at store_root, default unlib.store.default_root())."""
    from unlib.store import Store

    models = models.strip()
    if models in ZOOS:
        cfg = ZOOS[models]
        store = Store(store_root)
        specs = tuple(ModelSpec(name=f"{models}/seed-{s}", source=str(store.zoo_model_dir(cfg.zoo_id, s)),
                                zoo=models, seed=s) for s in cfg.seeds)
        return ModelSet(models, specs, ZOO_DEFAULTS[models])
    if models in HUB_SETS:
        return ModelSet(models, tuple(ModelSpec(n, n) for n in hub_set(models)))
    names = [m.strip() for m in models.split(",") if m.strip()]
    if len(names) < 2:
        known = ", ".join(list(ZOOS) + list(HUB_SETS))
        raise ModelError(f"unknown model set {models!r}: use one of {known}, "
                         f"or a comma-separated list of at least two models")
    specs, seen = [], {}
    for n in names:
        if not os.path.isdir(n) and (n.startswith((".", "/", "~")) or n.count("/") > 1):
            raise ModelError(f"model folder {n!r} does not exist")
        # a folder however spelled (relative, absolute, through a link); a hub name in any case
        key = ("folder", os.path.realpath(n)) if os.path.isdir(n) else ("hub", n.lower())
        if key in seen:
            also = f" (as {seen[key]!r} and {n!r})" if seen[key] != n else ""
            raise ModelError(f"model {n!r} is listed twice in MODELS{also}: a model compared with itself "
                             f"correlates 1 everywhere; list each model once")
        seen[key] = n
        specs.append(ModelSpec(n, n))
    return ModelSet(list_name(names), tuple(specs))


def list_name(names: list[str]) -> str:
    """The results-folder name of a comma-separated model list: each model's parent and folder
    names (a hub model's name), and a short hash of the resolved paths, so lists whose
    folders share names (exp1/m0 and exp2/m0) never share results."""
    parts, keys = [], []
    for n in names:
        if os.path.isdir(n):
            resolved = Path(n).resolve()
            parts.append(slug(f"{resolved.parent.name}-{resolved.name}"))
            keys.append(str(resolved))
        else:
            parts.append(slug(n.split("/")[-1]))
            keys.append(n)
    label = "+".join(parts)
    if len(label) > 48:
        label = f"{parts[0]}+{len(parts) - 1}-more"
    return f"{label}-{short_hash(keys, 6)}"


# Checkpoint subfolders of a local model: `checkpoint-<step>` (Hugging Face Trainer, Stanford
# CRFM) or `step<N>` (Pythia's revision names).
CHECKPOINT_FOLDER = re.compile(r"(?:checkpoint-|step)(\d+)")


def local_checkpoints(folder: str | Path) -> dict[int, Path]:
    """{step: subfolder} of a local model folder's checkpoint subfolders."""
    found = {}
    for p in Path(folder).iterdir():
        match = CHECKPOINT_FOLDER.fullmatch(p.name)
        if match and p.is_dir():
            found[int(match.group(1))] = p
    return dict(sorted(found.items()))


def available_checkpoints(spec: ModelSpec) -> list[int] | None:
    """Training steps a model offers, or None when it has no checkpoint schedule: a toy zoo's
    saved steps, a local folder's checkpoint subfolders, or TransformerLens's schedule for a
    checkpointed hub family (Stanford CRFM, Pythia)."""
    if spec.zoo is not None:
        return sorted(ZOOS[spec.zoo].save_steps)
    if os.path.isdir(spec.source):
        return list(local_checkpoints(spec.source)) or None
    from transformer_lens.tools.model_registry.checkpoints import get_checkpoint_labels

    try:
        with tl_warnings_silenced():
            labels, kind = get_checkpoint_labels(spec.source)
    except (ValueError, OSError):  # not checkpointed (or, offline, a family listed only on the hub)
        return None
    return sorted(labels) if kind == "step" else None


@contextlib.contextmanager
def tl_warnings_silenced():
    """TransformerLens's checkpoint schedules log a warning to the root logger on every Pythia
    lookup (a note on Pythia's 2023 re-upload); we ask often and the note is not the user's."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


def model_fingerprint(spec: ModelSpec, checkpoint: int | None, weights: bool = True) -> str:
    """What identifies the model a run loads (without `weights`: its tokenizer and config): a
    local folder's files by content (size and modification time for large ones, see
    unlib.store.file_fingerprint), toy-zoo checkpoints included; a hub model by the commit its
    local cache resolved, else its name and revision."""
    location, revision = model_location(spec, checkpoint)
    if os.path.isdir(location):
        files = sorted(p for p in Path(location).iterdir()
                       if p.is_file() and p.name != TRAINING_STATE and not p.name.startswith(".")
                       and (weights or not p.name.endswith(WEIGHT_SUFFIXES)))
        return short_hash({p.name: file_fingerprint(p) for p in files}, 16)
    if spec.zoo is not None:
        return "not trained yet"
    return f"{location}@{hub_commit(location, revision) or revision or 'main'}"


def hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit a hub model's revision resolves to in the local Hugging Face cache, if cached."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, "config.json", revision=revision)
    return Path(path).parent.name if isinstance(path, str) else None


def nearest_steps(step: int, steps: list[int]) -> list[int]:
    i = bisect.bisect_left(steps, step)
    return sorted({steps[j] for j in (i - 1, i) if 0 <= j < len(steps)})


def check_checkpoint(spec: ModelSpec, checkpoint: int | None) -> None:
    """Refuse a checkpoint the model does not have, naming the nearest valid steps."""
    if checkpoint is None:
        return
    steps = available_checkpoints(spec)
    if steps is None:
        raise ModelError(f"model {spec.name} has no training checkpoints; omit CHECKPOINT to use its final weights")
    if checkpoint not in steps:
        near = " or ".join(str(s) for s in nearest_steps(checkpoint, steps))
        raise ModelError(f"model {spec.name} has no checkpoint at step {checkpoint}; nearest: {near}")


def resolve_device(device: str) -> str:
    """A DEVICE value (case-insensitive) as a torch device string: 'auto' -> cuda when a GPU
    is available, else cpu; cpu; cuda or cuda:N (refused without that GPU); mps (refused
    where Apple's Metal backend is missing). Anything else is refused."""
    text = str(device).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    cuda = re.fullmatch(r"cuda(?::(\d+))?", text)
    if cuda:
        if not torch.cuda.is_available():
            raise ModelError(f"DEVICE={device} but no CUDA GPU is available; use DEVICE=cpu or DEVICE=auto")
        count = torch.cuda.device_count()
        if cuda.group(1) is not None and int(cuda.group(1)) >= count:
            raise ModelError(f"DEVICE={device} but this machine has {count} CUDA GPU(s): use cuda:0"
                             f"{f' to cuda:{count - 1}' if count > 1 else ''}, cuda or auto")
        return text
    if text == "mps":
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return text
        raise ModelError(f"DEVICE={device} but Apple's Metal (MPS) backend is not available here; "
                         f"use DEVICE=cpu, cuda or auto")
    raise ModelError(f"DEVICE={device!r} is not a device: use auto, cpu, cuda, cuda:N or mps (any case)")


def model_location(spec: ModelSpec, checkpoint: int | None) -> tuple[str, str | None]:
    """(path or hub name, hub revision) to load `spec` at `checkpoint` (None: its final
    weights; a local folder without its own config.json: its last checkpoint subfolder).
    A hub revision follows TransformerLens's convention for the family (`checkpoint-<step>`
    for Stanford CRFM, `step<N>` for Pythia)."""
    if spec.zoo is not None:
        step = checkpoint if checkpoint is not None else max(ZOOS[spec.zoo].save_steps)
        return str(Path(spec.source) / f"checkpoint-{step}"), None
    if os.path.isdir(spec.source):
        steps = local_checkpoints(spec.source)
        if checkpoint is not None:
            return str(steps.get(checkpoint, Path(spec.source) / f"checkpoint-{checkpoint}")), None
        if not (Path(spec.source) / "config.json").exists() and steps:
            return str(steps[max(steps)]), None
        return spec.source, None
    if checkpoint is None:
        return spec.source, None
    check_transformer_lens()  # a private function: its place and signature may change outside 4.x
    from transformer_lens.model_bridge.sources.transformers import _resolve_checkpoint_to_revision

    try:
        with tl_warnings_silenced():
            return spec.source, _resolve_checkpoint_to_revision(spec.source, None, checkpoint)
    except ValueError as exc:
        raise ModelError(f"model {spec.name} has no checkpoint at step {checkpoint} ({exc})") from exc


SUPPORTED_TRANSFORMER_LENS = (4, 5)  # [4, 5): the range pyproject.toml and requirements.txt ask for


def check_transformer_lens() -> None:
    """Refuse, in one line, a TransformerLens outside the supported range before one of its
    private functions (the only such use: checkpoint revisions) is called."""
    from importlib.metadata import version

    found = version("transformer-lens")
    low, high = SUPPORTED_TRANSFORMER_LENS
    if not low <= int(found.split(".")[0]) < high:
        raise ModelError(f"transformer-lens {found} is installed; this project supports >={low},<{high}: "
                         f"pip install 'transformer-lens>={low},<{high}'")


@functools.lru_cache(maxsize=None)
def mlp_shape(spec: ModelSpec, checkpoint: int | None) -> tuple[int, int]:
    """(n_layers, d_mlp), read from the model's config without loading weights."""
    if spec.zoo is not None:
        return ZOOS[spec.zoo].n_layers, ZOOS[spec.zoo].d_mlp
    from transformers import AutoConfig

    location, revision = model_location(spec, checkpoint)
    try:
        config = AutoConfig.from_pretrained(location, revision=revision)
    except OSError as exc:
        raise _unreachable(spec, revision) from exc
    d_mlp = getattr(config, "n_inner", None) or getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return config.num_hidden_layers, d_mlp


def planned_shape(model_set: ModelSet, spec: ModelSpec, checkpoint: int | None) -> tuple[int, int]:
    """mlp_shape, or for a model of a HUB_SETS set whose config is not at hand (offline) the
    set's published shape (HUB_SHAPES): enough to plan a run, not to start one."""
    try:
        return mlp_shape(spec, checkpoint)
    except ModelError:
        if model_set.name in HUB_SHAPES:
            return HUB_SHAPES[model_set.name]
        raise


def max_context(spec: ModelSpec) -> int | None:
    """The longest sequence the model takes (None when its config does not say)."""
    if spec.zoo is not None:
        return ZOOS[spec.zoo].ctx_len
    from transformers import AutoConfig

    location, revision = model_location(spec, None)
    config = AutoConfig.from_pretrained(location, revision=revision)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _unreachable(spec: ModelSpec, revision: str | None) -> ModelError:
    at = f" --revision {revision}" if revision else ""
    return ModelError(f"cannot load model {spec.name}{f' at {revision}' if revision else ''}: it is not in the "
                      f"local Hugging Face cache and the hub cannot be reached; pre-fetch it on a connected "
                      f"machine (`huggingface-cli download {spec.source}{at}`) or pass a local folder")


def load_tokenizer(model_set: ModelSet, store_root: str | Path | None = None):
    """The set's tokenizer: the toy zoo's own, or the first model's."""
    from transformers import AutoTokenizer

    from unlib.store import Store

    quiet_transformers()
    if model_set.zoo:
        return AutoTokenizer.from_pretrained(str(Store(store_root).zoo_tokenizer_dir(ZOOS[model_set.zoo].zoo_id)))
    location, revision = model_location(model_set.models[0], None)
    return AutoTokenizer.from_pretrained(location, revision=revision)


def check_same_tokenizer(specs: tuple[ModelSpec, ...] | list[ModelSpec]) -> None:
    """Refuse a set whose models tokenize differently (their activations would not be over
    the same tokens), or a model without a usable tokenizer (a folder saved without its
    tokenizer files loads as a tokenizer of one token or none)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    vocabularies = {}
    for spec in specs:
        location, revision = model_location(spec, None)
        try:
            vocabularies[spec.name] = AutoTokenizer.from_pretrained(location, revision=revision).get_vocab()
        except OSError as exc:
            raise _unreachable(spec, revision) from exc
        except (ValueError, TypeError) as exc:  # transformers: no tokenizer class or files it can build one from
            raise ModelError(f"model {spec.name} has no usable tokenizer in {location} "
                             f"({str(exc).splitlines()[0][:120]}); save it with the model: "
                             f"tokenizer.save_pretrained(folder)") from None
        if len(vocabularies[spec.name]) < 2:
            raise ModelError(f"model {spec.name} has no usable tokenizer in {location} (it loads as "
                             f"{len(vocabularies[spec.name])} token(s)): save it with the model: "
                             f"tokenizer.save_pretrained(folder)")
    first, *rest = vocabularies
    for name in rest:
        if vocabularies[name] != vocabularies[first]:
            raise ModelError(f"models {first} and {name} have different tokenizers ({len(vocabularies[first])} and "
                             f"{len(vocabularies[name])} tokens); all models of a set must share one tokenizer")


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files a `save_pretrained` folder holds: one file, or the shards its index
    (`<name>.index.json`) lists; safetensors preferred, as transformers loads them."""
    import json

    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelError(f"model weights index {index} is unreadable ({type(exc).__name__}); "
                                 f"save the model again") from None
            return [folder / s for s in shards]
    return []


def weights_problem(folder: str | Path) -> str | None:
    """Why the weights of a local model folder cannot load (naming the file), or None. Cheap:
    reads the safetensors headers (which must cover each file exactly) and a .bin's zip
    directory, not the tensors."""
    files = weight_files(folder)
    if not files:
        return (f"model folder {folder} holds no weights ({' or '.join(WEIGHT_FILES)}, or their sharded "
                f"index); save the model with save_pretrained")
    for path in files:
        if not path.is_file():
            return f"model weights file {path} is missing (listed in the folder's index); save the model again"
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    f.keys()
            else:
                import zipfile

                if path.stat().st_size == 0:
                    raise ValueError("the file is empty")
                with open(path, "rb") as f:
                    zipped = f.read(2) == b"PK"
                if zipped:  # torch.save's format since 1.6; older pickles are left to the loader
                    zipfile.ZipFile(path).close()
        except Exception as exc:  # safetensors, zipfile and the OS raise their own types
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return (f"model weights file {path} does not load ({reason}); it is truncated or corrupt: "
                    f"save or download the model again")
    return None


def check_weights(spec: ModelSpec, checkpoint: int | None) -> None:
    """Refuse a local model folder (not a toy-zoo one, which the pipeline trains and checks)
    whose weights cannot load, naming the file, before any work starts."""
    if spec.zoo is not None or not os.path.isdir(spec.source):
        return
    location, _ = model_location(spec, checkpoint)
    problem = weights_problem(location)
    if problem:
        raise ModelError(problem)


def load_model(spec: ModelSpec, checkpoint: int | None, device: str = "cpu"):
    """Load a model as a TransformerBridge in eval mode (raw HF weights, hooks on). A local
    folder that fails to load is a ModelError naming the weights file at fault."""
    from transformer_lens.model_bridge import TransformerBridge

    quiet_transformers()
    location, revision = model_location(spec, checkpoint)
    try:
        model = TransformerBridge.boot_transformers(location, device=device, revision=revision)
    except Exception as exc:
        if os.path.isdir(location):  # a local folder (or a zoo checkpoint): name the file at fault
            problem = weights_problem(location)
            if problem:
                raise ModelError(problem) from exc
            files = ", ".join(p.name for p in weight_files(location))
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelError(f"cannot load model {spec.name} from {location} ({files}): {type(exc).__name__}: "
                             f"{reason}; save or download the model again") from exc
        if isinstance(exc, OSError):
            raise _unreachable(spec, revision) from exc
        raise
    model.eval()
    return model


def is_gated(model) -> bool:
    """Whether the model's MLP is gated (Llama-style: down(act(gate(x)) * up(x)))."""
    return "blocks.0.mlp.hook_pre_linear" in model.hook_dict


@torch.no_grad()
def processed_weights(model) -> dict[str, torch.Tensor]:
    """A bridge's MLP and unembedding weights after HookedTransformer's default processing (fold
    LayerNorm, centre writing weights, centre the unembedding), as float64 CPU tensors: W_in
    (layers, d_model, d_mlp), b_in (layers, d_mlp), W_out (layers, d_mlp, d_model), W_U (d_model, vocab).
    For a gated MLP, W_in is the gate (what `hook_pre` reads) and b_in its bias, zero where the
    model has none; the up projection (`hook_pre_linear`) only scales the gated output."""
    # A copy is processed so that the caller's bridge keeps its raw weights, hooks and activations.
    processed = copy.deepcopy(model)
    # Not a bare process_weights(): that leaves the b_in alias on the unfolded bias (TransformerLens 4);
    # compatibility mode re-points the aliases at the processed tensors.
    processed.enable_compatibility_mode(disable_warnings=True)
    gated = is_gated(model)
    w_in = processed.W_gate if gated else processed.W_in
    try:  # a bias-free projection has no stacked bias (TransformerLens raises AttributeError)
        b_in = getattr(processed, "b_gate" if gated else "b_in")
    except AttributeError:
        b_in = None
    b_in = torch.zeros(w_in.shape[0], w_in.shape[2]) if b_in is None else b_in
    return {name: t.detach().double().cpu() for name, t in
            (("W_in", w_in), ("b_in", b_in), ("W_out", processed.W_out), ("W_U", processed.W_U))}


def hook_post(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def hook_pre(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_pre"


def default_keep(tokens: torch.Tensor) -> torch.Tensor:
    """The analysed positions when no exclusion is given: every position but 0 (BOS)."""
    keep = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    keep[:, 0] = False
    return keep


class _AllCaptured(Exception):
    """Raised by the last layer's hook: what follows it (the unembedding) is not needed."""


@torch.no_grad()
def mlp_activations(model, tokens: torch.Tensor, keep: torch.Tensor | None = None,
                    hook: str = "post") -> list[torch.Tensor]:
    """Per-layer MLP activations of a token batch (batch, ctx) at the kept positions (`keep`,
    a boolean (batch, ctx) mask, default every position but BOS at 0), as (kept positions,
    d_mlp) float32 tensors on the model's device, positions in row-major order. The forward
    pass stops at the last layer's hook, so its cost does not grow with the vocabulary."""
    return mlp_captures(model, tokens, keep, (hook,))[hook]


@torch.no_grad()
def mlp_captures(model, tokens: torch.Tensor, keep: torch.Tensor | None = None,
                 hooks: tuple[str, ...] = ("pre", "post")) -> dict[str, list[torch.Tensor]]:
    """mlp_activations for several hook points ("pre", "post") in one forward pass:
    {hook: per-layer activations}. The pass stops at the last layer's last of them."""
    n_layers = model.cfg.n_layers
    names = {"pre": hook_pre, "post": hook_post}
    last = "post" if "post" in hooks else "pre"  # hook_post runs after hook_pre in a block
    keep = (default_keep(tokens) if keep is None else keep).to(tokens.device)
    captured: dict[str, list[torch.Tensor | None]] = {h: [None] * n_layers for h in hooks}

    def keeper(kind: str, layer: int):
        # Bridge hook points may report an aliased name, so the layer comes from the closure.
        def keep_activations(act, hook):
            captured[kind][layer] = act[keep].float()
            if layer == n_layers - 1 and kind == last:
                raise _AllCaptured
            return act
        return keep_activations

    try:
        model.run_with_hooks(tokens, fwd_hooks=[(names[h](l), keeper(h, l)) for h in hooks for l in range(n_layers)],
                             return_type=None)
    except _AllCaptured:
        pass
    return captured
