"""Loading a model through TransformerLens's TransformerBridge, and what is checked and read
before it loads: its MLP shape and context from its config, its tokenizer, its weight files,
the device it runs on, and the fingerprint that identifies what a run loads.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import torch

from unlib.checkpoints import model_location
from unlib.engine.memory import ModelFootprint
from unlib.h5read import read_h5
from unlib.hub import fetch_advice, model_download
from unlib.model_sets import HUB_SHAPES, ZOOS, ModelError, ModelSet, ModelSpec
from unlib.store import file_fingerprint, short_hash
from unlib.zoo import TRAINING_STATE, quiet_transformers

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


@functools.lru_cache(maxsize=None)
def model_config(spec: ModelSpec, checkpoint: int | None):
    """The model's transformers config, read without its weights (a zoo's from its ZooConfig)."""
    if spec.zoo is not None:
        from unlib.zoo import hf_config

        return hf_config(ZOOS[spec.zoo], ZOOS[spec.zoo].vocab_size)
    from transformers import AutoConfig

    location, revision = model_location(spec, checkpoint)
    try:
        return AutoConfig.from_pretrained(location, revision=revision)
    except OSError as exc:
        raise HubUnreachable(spec, revision) from exc


def mlp_shape(spec: ModelSpec, checkpoint: int | None) -> tuple[int, int]:
    """(n_layers, d_mlp), read from the model's config without loading weights."""
    config = model_config(spec, checkpoint)
    d_mlp = getattr(config, "n_inner", None) or getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return config.num_hidden_layers, d_mlp


@functools.lru_cache(maxsize=None)
def model_footprint(spec: ModelSpec, checkpoint: int | None) -> ModelFootprint:
    """What running the model takes (for the no-cache feed's memory plan): its parameters and
    buffers counted on a model built on the meta device (no memory, no weights read), as the
    float32 they load as, and its widths."""
    from transformers import AutoModelForCausalLM

    config = model_config(spec, checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = sum(t.numel() * max(4, t.element_size()) for t in (*model.parameters(), *model.buffers()))
    return ModelFootprint(weights, config.hidden_size, config.num_attention_heads, mlp_shape(spec, checkpoint)[1])


def planned_footprint(model_set: ModelSet, spec: ModelSpec, checkpoint: int | None
                      ) -> tuple[tuple[int, int], ModelFootprint]:
    """(mlp_shape, model_footprint), from the set's published shape (HUB_SHAPES) when the
    config of a HUB_SETS model is not at hand (offline)."""
    try:
        return mlp_shape(spec, checkpoint), model_footprint(spec, checkpoint)
    except ModelError:
        if model_set.name not in HUB_SHAPES:
            raise
        hub = HUB_SHAPES[model_set.name]
        return (hub.n_layers, hub.d_mlp), ModelFootprint(4 * hub.n_parameters, hub.d_model, hub.n_heads, hub.d_mlp)


def max_context(spec: ModelSpec) -> int | None:
    """The longest sequence the model takes (None when its config does not say)."""
    config = model_config(spec, None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


class HubUnreachable(ModelError):
    """A hub model neither in the local cache nor reachable; `command` fetches it."""

    def __init__(self, spec: ModelSpec, revision: str | None):
        self.model, self.command = spec.name, model_download(spec.source, revision)
        super().__init__(f"cannot load model {spec.name}{f' at {revision}' if revision else ''}: it is not in the "
                         f"local Hugging Face cache and the hub cannot be reached; {fetch_advice([self.command])}, "
                         f"or pass a local folder")



def load_tokenizer(model_set: ModelSet, store_root: str | Path | None = None):
    """The set's tokenizer: the toy zoo's own, or the first model's."""
    from transformers import AutoTokenizer

    from unlib.store import Store

    quiet_transformers()
    if model_set.zoo:
        return AutoTokenizer.from_pretrained(str(Store(store_root).zoo_tokenizer_dir(ZOOS[model_set.zoo].zoo_id)))
    location, revision = model_location(model_set.models[0], None)
    return AutoTokenizer.from_pretrained(location, revision=revision)


def training_vocabulary(model_set: ModelSet, store_root: str | Path | None = None) -> np.ndarray | None:
    """The token ids a toy zoo's training data held (its train_tokens.h5, verified), or None
    for other models, whose training data is not at hand: every id counts."""
    from unlib.store import Store

    if not model_set.zoo:
        return None
    arrays, _ = read_h5(Store(store_root).zoo_training_tokens(ZOOS[model_set.zoo].zoo_id))
    return np.unique(arrays["tokens"])


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
            raise HubUnreachable(spec, revision) from exc
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
            raise HubUnreachable(spec, revision) from exc
        raise
    model.eval()
    return model
