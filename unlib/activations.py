"""Activation caches: MLP post-nonlinearity activations of one model over one token file,
one float32 dataset per layer (`layer_000`, ...) of shape (n_tokens, d_mlp), chunked by
token blocks, written crash-safely and resumable from the last complete block.

float32, not float16: a neuron that is almost off (a GELU of a very negative pre-activation,
values ~1e-5) lies in float16's subnormal range, where rounding is a large part of its
variance, and its correlations (and those of neurons whose best match it is) move by up to
0.2 on a small random GPT-NeoX; the paper correlates float32 activations."""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from unlib.h5read import H5Reader
from unlib.h5write import PartialH5
from unlib.mlp_hooks import mlp_activations, mlp_rows
from unlib.store import h5_attrs

CHUNK_BYTES = 512 * 1024
CACHE_DTYPE = "float32"
VALUE_BYTES = np.dtype(CACHE_DTYPE).itemsize


def layer_name(layer: int) -> str:
    return f"layer_{layer:03d}"


def chunk_rows(d_mlp: int) -> int:
    """Rows per HDF5 chunk: full-width chunks of about 512 KiB."""
    return max(1, CHUNK_BYTES // (VALUE_BYTES * d_mlp))


def cache_activations(model, tokens: np.ndarray, keep: np.ndarray, out_path: str | Path, attrs: dict,
                      batch_size: int = 32, progress: Callable[[int, int], None] | None = None,
                      made_from: str = "{}") -> None:
    """Run `model` over the token sequences and write its MLP activations at the kept
    positions (`keep`, boolean like `tokens`) to `out_path`, one row per kept position.

    Resumes a partial file left by an interrupted run from its last complete chunk.
    `made_from`: the content digests of the store files it is made from (JSON), recorded."""
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    rows_before = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])  # rows of the sequences before each
    n_tokens = int(rows_before[-1])
    rows = chunk_rows(d_mlp)
    writer = PartialH5(out_path, {layer_name(l): ((n_tokens, d_mlp), CACHE_DTYPE, (min(rows, n_tokens), d_mlp))
                                  for l in range(n_layers)},
                       {**h5_attrs(attrs), "n_layers": n_layers, "d_mlp": d_mlp, "made_from": made_from})
    try:
        device = next(model.parameters()).device
        # from the sequence holding the first row not yet written (the writer skips rows it has)
        seq = int(np.searchsorted(rows_before, writer.rows_done, side="right")) - 1
        while seq < tokens.shape[0]:
            stop = min(tokens.shape[0], seq + batch_size)
            batch = torch.from_numpy(tokens[seq:stop].astype(np.int64)).to(device)
            acts = mlp_activations(model, batch, torch.from_numpy(keep[seq:stop]))
            if len(acts[0]):
                writer.write_rows(int(rows_before[seq]),
                                  {layer_name(l): a.cpu().numpy() for l, a in enumerate(acts)})
            seq = stop
            if progress is not None:
                progress(int(rows_before[seq]), n_tokens)
        writer.finish()
    finally:
        writer.close()


class ActivationCache:
    """Verified read access to a finished activation cache (unlib.h5read.H5Reader: a read
    whose values do not match their checksums raises DamagedFile)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with H5Reader(self.path) as reader:
            self.layers = [name for name in reader.names() if name.startswith("layer_")]
            self.n_tokens, self.d_mlp = reader.shape(self.layers[0])
            self.chunk_rows = reader.unit_rows(self.layers[0])
            self.attrs = reader.attrs

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def read(self, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        with H5Reader(self.path) as reader:
            return reader.read(self.layers[layer], start, stop)


def _prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """Produce `items` in a background thread, `depth` ahead, so the disk reads of the
    next chunk overlap the arithmetic on this one. If the consumer stops early (an error,
    a closed generator) the thread stops too and `items` is closed (its files with it)."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, re-raised there
            put(exc)
        finally:
            items.close()
        put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def cached_chunks(caches: list[ActivationCache], chunk_tokens: int, device: str | torch.device = "cpu",
                  needed: list[set[int]] | None = None) -> Iterator[list[torch.Tensor | None]]:
    """Stream the same token range of several caches: yields, per model, a float32 tensor
    (tokens, n_layers * d_mlp) on `device` holding the layers in `needed` (zeros for the
    others; None for a model with none needed). Reads whole HDF5 chunks (chunk_tokens is
    rounded to a multiple of the chunk rows), each verified against its checksum, with a
    read-ahead thread."""
    rows = max(c.chunk_rows for c in caches)
    chunk_tokens = max(rows, chunk_tokens // rows * rows)
    needed = needed or [set(range(c.n_layers)) for c in caches]

    def read() -> Iterator[list[torch.Tensor | None]]:
        files = [H5Reader(c.path) for c in caches]
        try:
            for start in range(0, caches[0].n_tokens, chunk_tokens):
                stop = min(caches[0].n_tokens, start + chunk_tokens)
                out = []
                for f, c, want in zip(files, caches, needed):
                    if not want:
                        out.append(None)
                        continue
                    # every column written below, or zeros: no pass to clear what is overwritten
                    make = torch.empty if len(want) == c.n_layers else torch.zeros
                    block = make(stop - start, c.n_layers * c.d_mlp)
                    target = block.numpy()
                    for l in want:
                        target[:, l * c.d_mlp:(l + 1) * c.d_mlp] = f.read(c.layers[l], start, stop)
                    out.append(block)
                yield out
        finally:
            for f in files:
                f.close()

    for chunk in _prefetched(read()):
        # rebound, so the host copy is let go once on the device (planning.HOST_CHUNKS)
        chunk = [None if block is None else block.to(device) for block in chunk]
        yield chunk


def model_chunks(models: list, tokens: np.ndarray, keep: np.ndarray, sequences: int, device: str = "cpu",
                 needed: list[set[int]] | None = None) -> Iterator[list[torch.Tensor | None]]:
    """The no-cache feed: run the models with a layer in `needed` (default all) on the same
    `sequences` token sequences at a time and yield, per model, its float32 activations at the
    kept positions (tokens, n_layers * d_mlp), as a cache holds them (None for a model with no
    layer needed)."""
    needed = needed or [set(range(m.cfg.n_layers)) for m in models]  # a model not needed may be None
    for seq in range(0, tokens.shape[0], sequences):
        batch = torch.from_numpy(tokens[seq:seq + sequences].astype(np.int64)).to(device)
        mask = torch.from_numpy(keep[seq:seq + sequences])
        if mask.any():
            yield [mlp_rows(m, batch, mask, layers) if layers else None for m, layers in zip(models, needed)]


def run_models(specs: list, checkpoint: int | None, tokens: np.ndarray, keep: np.ndarray, sequences: int,
               device: str, needed: list[set[int]]) -> Iterator[list[torch.Tensor | None]]:
    """model_chunks of the models with a layer in `needed`, loaded here: their weights are
    let go when the stream ends, before the result step (the memory plan counts them in the
    stream only)."""
    from unlib.model_loading import load_model

    models = [load_model(spec, checkpoint, device) if layers else None for spec, layers in zip(specs, needed)]
    yield from model_chunks(models, tokens, keep, sequences, device, needed)


def cache_bytes(n_tokens: int, shapes: list[tuple[int, int]]) -> int:
    """Disk space of activation caches for models of the given (n_layers, d_mlp)."""
    return sum(VALUE_BYTES * n_tokens * n_layers * d_mlp for n_layers, d_mlp in shapes)


def choose_feed(cache: str, needed_bytes: int, free_bytes: int) -> tuple[bool, str]:
    """(use the HDF5 caches?, why). cache: '1' forces caches, '0' forces the streaming
    feed, 'auto' caches when they fit in 90 % of the free disk."""
    size = f"{needed_bytes / 2**30:.2f} GiB of activation caches"
    if cache == "1":
        return True, f"CACHE=1 asks for {size}"
    if cache == "0":
        return False, "CACHE=0 asks to run the models instead of caching"
    if needed_bytes <= 0.9 * free_bytes:
        return True, f"{size} fit the {free_bytes / 2**30:.1f} GiB free"
    return False, f"{size} do not fit the {free_bytes / 2**30:.1f} GiB free"
