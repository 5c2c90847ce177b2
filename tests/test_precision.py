"""The stream's precision modes (PRECISION) against float64 on planted data: each mode's max
and rotated-baseline correlations stay within its documented error, the reduced modes do round
(their error exceeds float32's), and torch's switches are left as they were."""
import contextlib

import numpy as np
import pytest
import torch

from unlib import UserError
from unlib.engine.engine import ExcessCorrelationEngine
from unlib.engine.planning import WorkPlan
from unlib.engine.precision import (DOCUMENTED_ERROR, PRECISIONS, Products, round_to_tf32_, runnable_precisions,
                                   self_check)

SIZES = [[128, 128], [128, 128], [128, 128]]
ROTATIONS = 2


def planted(n: int = 24_000, seed: int = 0) -> list[np.ndarray]:
    """Three models' ReLU activations sharing a latent (correlations up to ~0.9), each
    neuron with its own offset and scale, as MLP neurons have."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 16))
    models = []
    for _ in SIZES:
        width = sum(s for s in SIZES[0])
        pre = latent @ rng.standard_normal((16, width)) * rng.uniform(0.2, 1, width) + rng.standard_normal((n, width))
        models.append((np.maximum(pre + rng.normal(0, 1, width), 0) * rng.uniform(0.1, 10, width)).astype(np.float32))
    return models


def float64_truth(data: list[np.ndarray], engine: ExcessCorrelationEngine) -> tuple[np.ndarray, np.ndarray]:
    """Per other model: each reference neuron's max correlation, and per rotation sample its
    max correlation against the rotated layers, in float64 from the engine's own rotations."""
    x = [d.astype(np.float64) - d.astype(np.float64).mean(0) for d in data]
    norm = [np.sqrt((c * c).sum(0)) for c in x]
    maxes, baselines = [], []
    for m in range(1, len(data)):
        cross = x[0].T @ x[m]
        maxes.append((cross / norm[0][:, None] / norm[m]).max(1))
        per_sample = []
        for r in range(ROTATIONS):
            layers = []
            for k, d in enumerate(SIZES[m]):
                cols = slice(k * d, (k + 1) * d)
                q = engine.rotation(m, k, r).double().numpy()
                rotated_norm = np.sqrt(((x[m][:, cols] @ q) ** 2).sum(0))
                layers.append(cross[:, cols] @ q / norm[0][:, None] / rotated_norm)
            per_sample.append(np.concatenate(layers, 1).max(1))
        baselines.append(per_sample)
    return np.array(maxes), np.array(baselines)


@pytest.fixture(scope="module")
def data_and_truth():
    data = planted()
    truth = float64_truth(data, ExcessCorrelationEngine(SIZES, [0], ROTATIONS))
    return data, truth


def engine_errors(data: list[np.ndarray], truth, precision: str) -> tuple[float, float]:
    engine = ExcessCorrelationEngine(SIZES, [0], ROTATIONS, precision=precision)
    tensors = [torch.from_numpy(d) for d in data]

    def chunks(needed):
        for start in range(0, len(data[0]), 4096):
            yield [t[start:start + 4096] for t in tensors]
    layers = engine.run(chunks)[0]
    got = np.concatenate([r.max_corr for r in layers], axis=1)
    got_base = np.concatenate([r.baseline_max_corr for r in layers], axis=2)
    return float(np.abs(got - truth[0]).max()), float(np.abs(got_base - truth[1]).max())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_mode_stays_within_its_documented_error_of_float64(data_and_truth, precision):
    if precision not in runnable_precisions("cpu"):
        pytest.skip(f"PRECISION={precision} is refused on this CPU (its oneDNN computes bf16 in float32)")
    data, truth = data_and_truth
    mkldnn = torch.backends.mkldnn.matmul.fp32_precision
    max_error, baseline_error = engine_errors(data, truth, precision)
    assert max_error <= DOCUMENTED_ERROR[precision], (precision, max_error)
    assert baseline_error <= DOCUMENTED_ERROR[precision], (precision, baseline_error)
    if precision in ("tf32", "bf16"):  # the mode takes effect: its rounding shows above float32's
        assert max_error > 10 * DOCUMENTED_ERROR["fp32"], (precision, max_error)
    assert torch.backends.mkldnn.matmul.fp32_precision == mkldnn  # the switch was set back


def test_tf32_rounding_keeps_ten_mantissa_bits():
    x = torch.tensor([1 + 2**-10, 1 + 2**-11, 1 + 2**-12, -(1 + 3 * 2**-12), 3.0e-3, 0.0])
    rounded = round_to_tf32_(x.clone())
    assert rounded.tolist() == [1 + 2**-10, 1 + 2**-10, 1.0, -(1 + 2**-10), rounded[4].item(), 0.0]
    assert abs(rounded[4].item() / 3.0e-3 - 1) <= 2**-11
    bits = rounded.view(torch.int32)
    assert bool(((bits & 0x1FFF) == 0).all())  # the 13 low mantissa bits are gone


def test_bf16x3_parts_sum_to_the_float32_operand_to_its_rounding():
    x = torch.randn(64, 32, dtype=torch.float32) * 7
    hi, lo = Products("bf16x3", "cpu").operand(x.clone())
    assert torch.equal(hi, hi.bfloat16().float())  # hi is exactly a bfloat16
    relative = ((hi.double() + lo.bfloat16().double()) - x.double()).abs() / x.double().abs()
    assert float(relative.max()) < 2**-15


def test_bf16x3_needs_memory_for_its_parts():
    sizes = [[512] * 2] * 2
    fp32, split = (WorkPlan(sizes, 0, precision=p, memory_budget=2**34) for p in ("fp32", "bf16x3"))
    units = fp32.passes[0]
    grown = split.stream_bytes(units)[0] - fp32.stream_bytes(units)[0]
    # a float32 copy of a block-bounded run of both models' centred rows, and oneDNN's bfloat16 copies
    assert grown == 4 * (2048 + 1) * 2560


def test_an_unknown_mode_is_refused_in_one_line():
    with pytest.raises(UserError, match="must be one of fp32, tf32, bf16, bf16x3"):
        ExcessCorrelationEngine(SIZES, [0], precision="fp16")


def test_a_mode_this_torch_cannot_run_is_refused_before_the_stream():
    """The GPU's bf16 path (bfloat16 operands, addmm into float32) taken on the CPU, where torch
    has no such kernel: the self-check refuses it in one line, naming modes that run."""
    products = Products("bf16", "cpu")
    products.on_gpu = True
    assert products.operand(torch.ones(4, 2))[0].dtype == torch.bfloat16
    with pytest.raises(UserError, match=r"PRECISION=bf16 cannot run on cpu with torch .*use PRECISION=fp32 or tf32"):
        self_check(products)


def test_bf16_that_would_run_in_float32_is_refused(monkeypatch):
    """Where oneDNN cannot multiply bfloat16 it computes in float32 without a word: the
    self-check sees that nothing was rounded and refuses the mode instead of mislabelling it."""
    monkeypatch.setattr(Products, "switches", lambda self: contextlib.nullcontext())
    with pytest.raises(UserError, match="PRECISION=bf16 computes in float32 on this cpu"):
        self_check(Products("bf16", "cpu"))
