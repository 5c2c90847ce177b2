"""Whether a correlation's memory plan is what happens: random-weight GPT-2 models of a
chosen shape are built with transformers, and one pass of the engine runs on them from
activation caches or from the models (no cache), its peak memory measured against the
plan's pass_bytes. Used by `make bench`, `make rehearse` and the tests."""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import re
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch

from unlib.engine.engine import ExcessCorrelationEngine
from unlib.engine.memory import ModelFeed

T = TypeVar("T")
VOCAB = 257  # the toy zoo's byte-level vocabulary
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@dataclasses.dataclass(frozen=True)
class Shape:
    """Models of one architecture: how many, their layers and widths, and the context."""

    n_models: int
    n_layers: int
    d_mlp: int
    d_model: int
    ctx_len: int

    @property
    def n_heads(self) -> int:
        return max(1, self.d_model // 64)

    def label(self) -> str:
        return f"{self.n_models} x {self.n_layers} x {self.d_mlp} (d_model {self.d_model}, ctx {self.ctx_len})"


def build_models(shape: Shape, folder: str | Path, tokenizer: bool = False) -> list[Path]:
    """Random-weight GPT-2 models of `shape` (seeds 0, 1, ...) saved in `folder`, unless there;
    with `tokenizer`, each with the toy zoo's byte-level one (for a run of the pipeline)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from unlib.zoo import quiet_transformers, train_tokenizer

    quiet_transformers()
    paths = []
    for seed in range(shape.n_models):
        path = Path(folder) / f"seed-{seed}"
        if not (path / "config.json").exists():
            torch.manual_seed(seed)
            config = GPT2Config(n_layer=shape.n_layers, n_embd=shape.d_model, n_inner=shape.d_mlp,
                                n_head=shape.n_heads, n_positions=shape.ctx_len, vocab_size=VOCAB,
                                bos_token_id=0, eos_token_id=0)
            GPT2LMHeadModel(config).save_pretrained(path)
        if tokenizer and not (path / "tokenizer.json").exists():
            train_tokenizer([""], VOCAB, 0, path)  # 257 tokens: the bytes and BOS, no merges
        paths.append(path)
    return paths


def _resident_bytes() -> tuple[int, int]:
    """(resident, its high-water mark) of this process, in bytes (Linux)."""
    status = open("/proc/self/status").read()
    return tuple(int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024 for key in ("VmRSS", "VmHWM"))


def fixed_mmap_threshold() -> None:
    """Buffers of 1 MiB and more mapped on their own and unmapped when freed (glibc's threshold
    otherwise grows up to 32 MiB, and freed heap stays resident): the resident set then
    follows the memory in use, as the GPU allocator's peak does. Best called first thing."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 2**20)


def peak_memory(work: Callable[[], T], device: str | torch.device, live: bool = True) -> tuple[T, int | None]:
    """(work(), the peak memory it took above what was in use when it started): on a GPU the
    allocator's peak; on the CPU the resident set's high-water mark (reset first; Linux, else
    None), with freed heap returned to the system before the start so that it cannot hide
    growth, and with `live` the allocator set so that it follows the memory in use
    (fixed_mmap_threshold) for the rest of the process."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = work()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    try:
        if live:
            fixed_mmap_threshold()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        start = _resident_bytes()[0]
    except (OSError, AttributeError):  # not Linux with glibc: not measured
        return work(), None
    result = work()
    return result, _resident_bytes()[1] - start


@dataclasses.dataclass
class Measured:
    """One pass's planned and measured peak memory."""

    shape: Shape
    feed: str  # "caches" or "models"
    planned: int
    measured: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.measured / self.planned


def random_tokens(shape: Shape, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, keep) of BOS-led random sequences holding `n_tokens` kept positions or a few more."""
    rows = -(-n_tokens // (shape.ctx_len - 1))
    tokens = np.random.default_rng(0).integers(1, VOCAB, (rows, shape.ctx_len)).astype(np.int32)
    tokens[:, 0] = 0
    keep = np.ones(tokens.shape, dtype=bool)
    keep[:, 0] = False
    return tokens, keep


def prepare(shape: Shape, folder: str | Path, n_tokens: int, device: str = "cpu") -> list[Path]:
    """Build (or reuse) `shape`'s models in `folder` and their activation caches of
    random_tokens; the caches' paths."""
    from unlib.activations import cache_activations
    from unlib.model_loading import load_model
    from unlib.model_sets import resolve_model_set

    paths = build_models(shape, folder)
    tokens, keep = random_tokens(shape, n_tokens)
    caches = [Path(folder) / f"{path.name}-{n_tokens}.h5" for path in paths]
    for spec, cache in zip(resolve_model_set(",".join(map(str, paths))).models, caches):
        if not cache.exists():
            cache_activations(load_model(spec, None, device), tokens, keep, cache, {})
    return caches


def measure_pass(shape: Shape, folder: str | Path, feed: str, n_tokens: int, device: str = "cpu",
                 chunk_tokens: int | None = None) -> Measured:
    """Run one pass of the engine over every unit (reference model 0, two rotations) of
    `shape`'s models in `folder` (prepare), from their activation caches (feed "caches") or
    from the models (feed "models", loaded inside the measurement: their weights count), with
    fp32 products, and measure its peak memory against the plan's. (Under bf16 on the CPU,
    oneDNN's bfloat16 buffers made the measured peak vary from run to run: 0.76 to 1.12 of the
    plan on the first shape.)"""
    import time

    from unlib.activations import ActivationCache, cached_chunks, model_chunks, run_models
    from unlib.model_loading import load_model, model_footprint
    from unlib.model_sets import resolve_model_set

    caches = [ActivationCache(path) for path in prepare(shape, folder, n_tokens, device)]
    specs = resolve_model_set(",".join(map(str, build_models(shape, folder)))).models
    tokens, keep = random_tokens(shape, n_tokens)
    model_feed = None if feed == "caches" else ModelFeed(tuple(model_footprint(s, None) for s in specs), shape.ctx_len)
    sizes = [[shape.d_mlp] * shape.n_layers for _ in range(shape.n_models)]
    engine = ExcessCorrelationEngine(sizes, 0, 2, 0, device, 2**42, chunk_tokens, feed=model_feed, n_tokens=n_tokens)
    units = engine.passes[0]
    # the libraries' one-time setup (imports, thread pools, first-call caches) before the
    # measurement: the plan counts a pass's memory, not the interpreter's
    warm = load_model(specs[0], None, device)
    next(model_chunks([warm], tokens[:1], keep[:1], 1, device))
    del warm

    def run_pass():
        if model_feed is None:
            chunks = lambda needed: cached_chunks(caches, engine.chunk_tokens, device, needed)  # noqa: E731
        else:
            chunks = functools.partial(run_models, specs, None, tokens, keep,
                                       model_feed.sequences(engine.chunk_tokens), device)
        return engine.run_pass(chunks, units)

    start = time.perf_counter()
    _, measured = peak_memory(run_pass, device)
    return Measured(shape, feed, engine.pass_bytes(units), measured, time.perf_counter() - start)


# Small shapes measured in seconds (make test), large ones at GPT-2-small width (make bench):
# each plans a pass of 150 MiB or more, so that the libraries' own few MiB stay inside 15 %.
# (shape, tokens, rows a chunk): several chunks, so the cache feed's read-ahead fills.
SMALL_SHAPES = ((Shape(2, 2, 1024, 256, 256), 16384, 2048), (Shape(2, 1, 2048, 512, 512), 16384, 2048),
                (Shape(3, 2, 768, 192, 128), 16384, 2048))
LARGE_SHAPES = ((Shape(2, 4, 3072, 768, 512), 8192, 1024), (Shape(3, 2, 3072, 768, 512), 8192, 1024),
                (Shape(2, 2, 4096, 1024, 1024), 8192, 2048))


def measure_shapes(shapes, folder: str | Path, device: str = "cpu") -> list[Measured]:
    """measure_pass for each (shape, tokens, chunk rows) and both feeds, models kept in `folder`."""
    where = [Path(folder) / "x".join(map(str, dataclasses.astuple(shape))) for shape, _, _ in shapes]
    for (shape, n_tokens, _), models in zip(shapes, where):  # every file first: the measurements come after
        prepare(shape, models, n_tokens, device)
    return [measure_pass(shape, models, feed, n_tokens, device, chunk_tokens)
            for (shape, n_tokens, chunk_tokens), models in zip(shapes, where) for feed in ("caches", "models")]


def main() -> None:
    """python -m unlib.memory_check FOLDER [large] [DEVICE]: the table of planned against
    measured peaks, and the same as JSON on the last line."""
    import json
    import sys

    fixed_mmap_threshold()
    args = sys.argv[1:]
    folder, size, device = args[0], (args[1:2] or ["small"])[0], (args[2:3] or ["cpu"])[0]
    results = measure_shapes(LARGE_SHAPES if size == "large" else SMALL_SHAPES, folder, device)
    for m in results:
        print(f"{m.shape.label():42s} {m.feed:7s} planned {m.planned / 2**20:8,.0f} MiB  measured "
              f"{m.measured / 2**20:8,.0f} MiB  ratio {m.ratio:.3f}  {m.seconds:6.1f} s", flush=True)
    print(json.dumps([{"shape": m.shape.label(), "feed": m.feed, "planned": m.planned, "measured": m.measured,
                       "seconds": m.seconds} for m in results]))


if __name__ == "__main__":
    main()
