"""Model sets: named groups of different-seed models, and what each analyses by default.

A model set is a named group of different-seed models: the built-in toy zoo, the Stanford
CRFM GPT-2 seeds, the Pythia-160m seeds, or any comma-separated list of Hugging Face names
and local `save_pretrained` folders (optionally holding `checkpoint-<step>` or `step<N>`
subfolders). Hub sets are TransformerLens's own (unlib.checkpoints has their checkpoints).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from unlib import UserError
from unlib.dataset import OFFLINE_CORPUS, PILE_SAMPLE
from unlib.store import short_hash, slug
from unlib.zoo import ZooConfig

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


@dataclasses.dataclass(frozen=True)
class HubShape:
    """A HUB_SETS model's shape, from its published config: `make plan` sizes a run of the
    set without the configs at hand."""

    n_layers: int
    d_mlp: int
    d_model: int
    n_heads: int
    n_parameters: int


HUB_SHAPES = {"stanford-gpt2-small": HubShape(12, 3072, 768, 12, 124_439_808),
              "stanford-gpt2-medium": HubShape(24, 4096, 1024, 16, 354_823_168),
              "pythia-160m": HubShape(12, 3072, 768, 12, 162_322_944)}


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
