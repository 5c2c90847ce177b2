"""Training checkpoints of a model, and where to load a model at one from: a toy zoo's saved
steps, a local folder's `checkpoint-<step>` or `step<N>` subfolders, and a checkpointed hub
family's schedule and revision names, which are TransformerLens's own. Every call of a private
TransformerLens function is in this module, after check_transformer_lens.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import os
import re
from pathlib import Path

from unlib.hub import offline_unless_reachable
from unlib.model_sets import ZOOS, ModelError, ModelSpec

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


def final_step(spec: ModelSpec) -> int | None:
    """The training step of a model's final weights where it is known: a zoo's last saved step,
    or a local folder's last checkpoint subfolder when the folder holds no weights of its own;
    None for a hub model (its main revision need not be one of its checkpoints)."""
    if spec.zoo is not None:
        return max(ZOOS[spec.zoo].save_steps)
    if os.path.isdir(spec.source) and not (Path(spec.source) / "config.json").exists():
        return max(local_checkpoints(spec.source), default=None)
    return None


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
    offline_unless_reachable()  # a hub model: asked once, so that an unreachable hub fails fast
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
