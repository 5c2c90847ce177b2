"""Memory: the budget one engine may use, and how many token rows a chunk of the feed holds."""
from __future__ import annotations

import dataclasses
import math
import subprocess

import torch

from unlib import UserError
from unlib.engine.layout import BYTES

MAX_CHUNK_TOKENS, MIN_CHUNK_TOKENS, CHUNK_BYTES = 4096, 256, 2**30
# Chunks of the cache feed on the host at once: two queued, one being read from the files, one
# in use (on the CPU) or being copied to the device.
HOST_CHUNKS = 4


class MemoryBudgetError(UserError):
    """CORR_MEMORY is too small for the smallest unit of work."""


def parse_bytes(text: str) -> int:
    """'8G', '512M', '1.5GB' or a plain number of bytes (at least one)."""
    value = text.strip().upper().removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(value[-1:], 1)
    number = float(value[:-1] if scale > 1 else value)
    if not math.isfinite(number) or number * scale < 1:
        raise ValueError(f"not a positive size: {text!r}")
    return int(number * scale)


def default_memory_budget(device: str | torch.device, engines: int = 1) -> int:
    """Bytes one engine may use: 80 % of the free memory of the GPU with the least (read with
    nvidia-smi, so that planning creates no CUDA context in a process that forks workers
    afterwards), or on the CPU half the available RAM shared by `engines` running at once."""
    if torch.device(device).type == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout
            return int(0.8 * min(int(mib) for mib in out.split()) * 2**20)
        except (OSError, subprocess.SubprocessError, ValueError):
            raise UserError("cannot read the GPUs' free memory with nvidia-smi: set CORR_MEMORY (e.g. 40G)") from None
    import psutil

    return int(0.5 * psutil.virtual_memory().available) // engines


def chunk_tokens_for(width: int) -> int:
    """Token rows per chunk for `width` neurons a row: MAX_CHUNK_TOKENS, or fewer (a power of
    two, at least MIN_CHUNK_TOKENS) so that a chunk holds at most CHUNK_BYTES. It follows the
    width alone (not the memory budget), so the results do not depend on the budget either;
    five GPT-2-medium seeds (491,520 neurons, 2 MB a row) read 512 rows a chunk."""
    rows = max(1, CHUNK_BYTES // (BYTES * width))
    return int(min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, 2 ** int(math.log2(rows)))))


@dataclasses.dataclass(frozen=True)
class ModelFootprint:
    """What running one model takes on its device: its weights, and the working memory of
    a forward pass, from its shape."""

    weight_bytes: int
    d_model: int
    n_heads: int
    d_mlp: int

    def forward_bytes(self, sequences: int, ctx_len: int) -> int:
        """Working memory of a forward pass over `sequences` sequences of `ctx_len` tokens,
        float32, per position: one layer's attention scores (heads x ctx; the feed lets go of
        each layer's pattern as the layer ends), the MLP's hidden activations with the
        nonlinearity's temporaries (3 x d_mlp) and the residual stream's copies (6 x d_model);
        within 15 % of the peaks measured on GPT-2 shapes (unlib.memory_check)."""
        per_position = self.n_heads * ctx_len + 3 * self.d_mlp + 6 * self.d_model
        return BYTES * sequences * ctx_len * per_position


@dataclasses.dataclass(frozen=True)
class ModelFeed:
    """The feed without activation caches: the models run on the engine's device, a chunk's
    whole sequences at a time (as many as the chunk's rows hold, at least one)."""

    models: tuple[ModelFootprint, ...]
    ctx_len: int

    def sequences(self, chunk_tokens: int) -> int:
        """Sequences a chunk holds: its rows' worth, at least one."""
        return max(1, chunk_tokens // self.ctx_len)
