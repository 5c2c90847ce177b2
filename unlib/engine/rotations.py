"""Haar-random rotations of a layer's neurons, reproducible from a seed on any device."""
from __future__ import annotations

import collections
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
import torch

# Haar draws whose Gaussians are drawn ahead on the host, one thread each, while the device
# factors the current one: the host's float64 Gaussian, not the device's QR, is most of a draw
# (0.3 s for 3072 x 3072 on one core of a 2-core CI CPU, about what a whole draw took on an
# H200). A constant, so plans do not depend on the machine.
ROTATION_LOOKAHEAD = 4


def haar_orthogonal(n: int, seed: Iterable[int] | int, device: str | torch.device = "cpu") -> torch.Tensor:
    """A Haar-distributed n x n orthogonal matrix (QR of a Gaussian matrix with the signs
    of R's diagonal moved into Q), float64 on `device`, reproducible from `seed`."""
    return orthogonal_from(gaussian(n, seed), device)


def gaussian(n: int, seed: Iterable[int] | int) -> torch.Tensor:
    """An n x n standard Gaussian float64 matrix drawn on the CPU from `seed`, whatever the
    device, so every device draws the same rotations."""
    state = np.random.SeedSequence(seed).generate_state(2)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(n, n, generator=gen, dtype=torch.float64)


def orthogonal_from(gaussian: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """The Haar rotation of a Gaussian matrix, factored on `device` (on an H200, 60 QRs of
    3072 x 3072 took 34 s on the host's CPU, most of a 43 s correlation)."""
    q, r = torch.linalg.qr(gaussian.to(device))
    return q * torch.sign(torch.diagonal(r))


def layer_rotations(layer_sizes: list[list[int]], rotation_seed: int, draws: list[tuple[int, int, int]],
                    device: str | torch.device) -> Iterator[tuple[torch.Tensor, float]]:
    """(rotation, seconds it took) for each (model, layer, sample) in `draws`, in order: the
    recorded-seed rotation, float32 on `device`. The Gaussians are drawn on the host
    ROTATION_LOOKAHEAD ahead, in as many threads, while the device factors the current one
    (the same numbers)."""
    todo = iter(draws)
    pool = ThreadPoolExecutor(ROTATION_LOOKAHEAD)
    ahead: collections.deque = collections.deque()

    def draw_next() -> None:
        for model, layer, sample in itertools.islice(todo, 1):
            ahead.append(pool.submit(gaussian, layer_sizes[model][layer], [rotation_seed, model, layer, sample]))
    try:
        for _ in range(ROTATION_LOOKAHEAD):
            draw_next()
        while ahead:
            start = time.perf_counter()
            drawn = ahead.popleft().result()
            draw_next()
            q = orthogonal_from(drawn, device).to(torch.float32)
            del drawn
            yield q, time.perf_counter() - start
    finally:  # also when the caller stops early or fails: no draw left running
        pool.shutdown(wait=True, cancel_futures=True)
