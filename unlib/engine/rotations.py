"""Haar-random rotations of a layer's neurons, reproducible from a seed and drawn where they are
used: the Gaussian comes from a counter-based generator (Philox4x32-10; Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011) run in the device's own integer arithmetic, so a
GPU draws it with the same bits as a CPU (but for a last bit where the device's float64
logarithm or cosine rounds otherwise), and the QR runs on the device too. Two devices'
rotations of one seed differ by the QRs' rounding: about 1e-6, a float32 QR's error."""
from __future__ import annotations

import math
import time
from typing import Iterable, Iterator

import numpy as np
import torch

# How a rotation is drawn, recorded with the correlations (part of their key: results drawn
# another way are not read as these).
ROTATION_RULE = ("Haar: QR (float64 on a CPU, float32 on a GPU), with R's diagonal signs moved into Q, of a "
                 "float32 Gaussian from Philox4x32-10 keyed by the seed sequence (rotation_seed, model, layer, "
                 "sample), Box-Muller in float64")
# The QR's precision per device type. A CPU's float32 QR (MKL) changes in its last bits with the
# number of threads, so WORKERS would change the baselines; in float64 the rotation rounds to the
# same float32 whatever the threads (but for a rare last bit at GPT-2's widths), and costs 1.5x
# float32's time. A GPU's QR is the same for the same card; float32 keeps Q orthogonal to 1e-6
# at 3072 (the draw needs 1e-5) and is the fast precision on every card (consumer cards run
# float64 at 1/64 of float32's rate).
QR_DTYPE = {"cpu": torch.float64, "cuda": torch.float32}
# Counters the generator runs at once: its temporaries (PHILOX_TEMPORARIES int64 arrays of this
# length) stay in a CPU's cache, and are long enough to fill a GPU.
PHILOX_BLOCK = {"cpu": 1 << 17, "cuda": 1 << 20}
PHILOX_TEMPORARIES = 24
_WORD = 0xFFFFFFFF
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int], rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32-`rounds` of four tensors of 32-bit words (held in int64) under a 2-word key:
    four tensors of random words, the published algorithm's to the bit."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _multiply_words(_MULTIPLIERS[0], c0)
        hi1, lo1 = _multiply_words(_MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_STEPS[0]) & _WORD, (k1 + _KEY_STEPS[1]) & _WORD
    return c0, c1, c2, c3


def _multiply_words(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of m * x, for 32-bit words x in int64: m is split into 16-bit
    halves so that no product overflows int64, and every device computes the same bits."""
    low = x * (m & 0xFFFF)
    high = x * (m >> 16)
    low += (high & 0xFFFF) << 16
    high >>= 16
    high += low >> 32
    low &= _WORD
    return high, low


def gaussian(n: int, seed: Iterable[int] | int, device: str | torch.device = "cpu") -> torch.Tensor:
    """An n x n standard Gaussian matrix, float32 on `device`, from `seed`: counter i of
    Philox4x32-10 (key and upper counter words from the seed's SeedSequence) gives entries
    4i..4i+3 by the Box-Muller transform of its words, whatever the device and block size."""
    device = torch.device(device)
    k0, k1, c2, c3 = (int(w) for w in np.random.SeedSequence(seed).generate_state(4))
    counters = -(-n * n // 4)
    out = torch.empty(counters, 4, dtype=torch.float32, device=device)
    block = philox_block(device)
    for start in range(0, counters, block):
        i = torch.arange(start, min(counters, start + block), dtype=torch.int64, device=device)
        words = philox4x32((i & _WORD, i >> 32, torch.full_like(i, c2), torch.full_like(i, c3)), (k0, k1))
        # uniforms in (0, 1) from each word (never 0, so the logarithm is finite)
        u = torch.stack(words, dim=1).double().add_(0.5).mul_(2.0 ** -32)
        radius = u[:, 0::2].log().mul_(-2.0).sqrt_()
        angle = u[:, 1::2].mul(2.0 * math.pi)
        out[start:start + len(i), 0::2] = radius * angle.cos()
        out[start:start + len(i), 1::2] = radius * angle.sin_()
        del i, words, u, radius, angle  # before the next block's, as the memory plan counts
    return out.view(-1)[:n * n].view(n, n)


def haar_orthogonal(n: int, seed: Iterable[int] | int, device: str | torch.device = "cpu") -> torch.Tensor:
    """A Haar-distributed n x n orthogonal matrix, float32 on `device`, reproducible from
    `seed`: the QR (in QR_DTYPE) of gaussian(n, seed) with the signs of R's diagonal moved
    into Q (|Q^T Q - I| is measured by make bench)."""
    device = torch.device(device)
    q, r = torch.linalg.qr(gaussian(n, seed, device).to(qr_dtype(device)))
    return q.mul_(torch.sign(torch.diagonal(r))).to(torch.float32)


def philox_block(device: torch.device) -> int:
    return PHILOX_BLOCK.get(device.type, PHILOX_BLOCK["cpu"])


def qr_dtype(device: torch.device) -> torch.dtype:
    return QR_DTYPE.get(device.type, torch.float32)


def draw_bytes(n: int, device: torch.device) -> int:
    """Working memory of one n x n draw on `device` (the memory plan's): the float32 Gaussian
    beside, first, the generator's temporaries, then the QR's copy of it, Q and R."""
    generator = 8 * PHILOX_TEMPORARIES * philox_block(device)
    return 4 * n * n + max(generator, qr_dtype(device).itemsize * 3 * n * n)


def layer_rotations(layer_sizes: list[list[int]], rotation_seed: int, draws: list[tuple[int, int, int]],
                    device: str | torch.device) -> Iterator[tuple[torch.Tensor, float]]:
    """(rotation, seconds it took) for each (model, layer, sample) in `draws`, in order: the
    recorded-seed rotation, float32, drawn and factored on `device`."""
    device = torch.device(device)
    for model, layer, sample in draws:
        start = time.perf_counter()
        q = haar_orthogonal(layer_sizes[model][layer], [rotation_seed, model, layer, sample], device)
        if device.type == "cuda":  # so that the seconds are the draw's, not its launch's
            torch.cuda.synchronize(device)
        yield q, time.perf_counter() - start
