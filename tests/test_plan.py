"""`make plan`: the correlation's figures for a planted configuration equal a hand computation,
the engine does the work the plan counts, and planning touches neither weights nor the store."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tasks.api import plan_correlation
from unlib.config import RunConfig
from unlib.engine.engine import ExcessCorrelationEngine
from unlib.engine.precision import default_precision

from conftest import REPO, cli_in_process

N = 8192  # tokens
D, LAYERS, MODELS = 64, 2, 3  # toy-zoo-mini: 3 seeds of 2 layers x 64 neurons
ROTATIONS = 5


def test_plan_figures_equal_a_hand_computation():
    names, plan = plan_correlation(RunConfig(models="toy-zoo-mini", n_tokens=N, corr_memory="1G", workers=1))
    width = LAYERS * D
    assert names == ["toy-zoo-mini/seed-0", "toy-zoo-mini/seed-1", "toy-zoo-mini/seed-2"]
    # reference 0 against seeds 1 and 2: two halves of float32 co-moments, 128 x 128 each
    assert plan.accumulator_bytes == 2 * 2 * 4 * width * width == 262_144
    assert len(plan.engine.passes) == plan.floor_passes == 1 and len(plan.groups) == 1
    assert plan.engine.chunk_tokens == 4096
    # each token: one GEMM row per pair (128 x 128), and the full within-layer co-moments of the
    # two rotated models (2 layers of 64 x 64 each); the reference's diagonal is no GEMM
    assert plan.stream_flops == 2 * N * (2 * width * width + 2 * LAYERS * D * D) == 805_306_368
    # per rotation and rotated layer (2 models x 2 layers): diag(Q^T S Q) on two halves, and the
    # reference's 128 rows against the rotated layer on two halves
    per_layer = 2 * 2 * D ** 3 + 2 * 2 * width * D * D
    assert plan.reduce_flops == ROTATIONS * 2 * LAYERS * per_layer == 62_914_560
    assert plan.rotation_draws == [D] * ROTATIONS * 2 * LAYERS
    assert plan.bytes_read == 4 * N * MODELS * width == 12_582_912
    # the estimate: the GEMM work at the given rate plus each QR at seconds per n^3
    assert math.isclose(plan.seconds(1e9, 1e-9), (805_306_368 + 62_914_560) / 1e9 + 20 * 64 ** 3 * 1e-9)

    # room for one row layer of a pair a pass: four passes, and each task reads its row layer
    # of the reference and the whole other model
    tight = plan_correlation(RunConfig(models="toy-zoo-mini", n_tokens=N,
                                             corr_memory=str(plan.engine.least_memory()), workers=1))[1]
    assert len(tight.engine.passes) == 4
    assert tight.floor_passes == math.ceil(262_144 / plan.engine.least_memory())
    assert tight.bytes_read == 4 * N * 4 * (D + width)
    assert tight.stream_flops == plan.stream_flops + 2 * N * 2 * LAYERS * D * D  # each rotated model read twice
    assert len(tight.rotation_draws) == 2 * len(plan.rotation_draws)  # a pair's rotations in both of its passes


def test_the_engine_does_the_work_the_plan_counts():
    sizes = [[12, 20], [12, 20], [16, 8, 8]]
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(3000, sum(s), generator=gen) for s in sizes]
    for references, budget in [([0], None), ([0, 2], None), ([0, 2], "tight")]:
        engine = ExcessCorrelationEngine(sizes, references, n_rotations=2)
        if budget:
            engine = ExcessCorrelationEngine(sizes, references, n_rotations=2, memory_budget=engine.least_memory())
            assert len(engine.passes) > 1
        feed = lambda needed: ([x[i:i + 700] for x in data] for i in range(0, 3000, 700))  # noqa: E731
        for units in engine.passes:
            assert engine.run_pass(feed, units).stats.flops == hand_count(sizes, references, units, 3000)


def hand_count(sizes: list[list[int]], references: list[int], units, n: int) -> float:
    """The stream's multiply-adds counted from the shapes: each unit's block (its row layers x
    every neuron of its column model) and, for each model another reference rotates, the
    within-layer products of every layer the pass reads; 2 FLOPs each, per token."""
    cross = sum(sum(sizes[u.row_model][l] for l in u.row_layers) * sum(sizes[u.col_model]) for u in units)
    read = {}
    for u in units:
        read.setdefault(u.row_model, set()).update(u.row_layers)
        read.setdefault(u.col_model, set()).update(range(len(sizes[u.col_model])))
    within = sum(sizes[m][l] ** 2 for m, layers in read.items() if any(r != m for r in references) for l in layers)
    return 2.0 * n * (cross + within)


def test_make_plan_prints_the_five_gpt2_medium_seeds_without_weights_or_store(tmp_path):
    store = tmp_path / "store"  # must stay absent: planning reads and writes nothing there
    env = {**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["make", "-s", "plan", f"PYTHON={sys.executable}", "MODELS=stanford-gpt2-medium",
                           "N_TOKENS=1000000", "DEVICE=cuda", "CORR_MEMORY=64G"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    # 4 pairs x 2 halves x (24 x 4096)^2 float32 = 288 GiB: at least 5 passes of 64 GiB; at most one more
    assert "288.00 GiB: 6 passes" in lines["accumulators"] and "budget: 5)" in lines["accumulators"]
    assert "512 tokens" in lines["chunk"]
    assert "no cuda device here" in lines["estimated"]
    assert not store.exists()
    proc = subprocess.run(["make", "-s", "plan", f"PYTHON={sys.executable}", "MODELS=toy-zoo-mini",
                           "N_TOKENS=8192", "CORR_MEMORY=1G", "DEVICE=cpu", "WORKERS=1"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "8.05e+08 streaming, 6.29e+07 reducing, 20 Haar rotations" in proc.stdout
    assert f"GFLOP/s {default_precision('cpu')} matmul" in proc.stdout and not store.exists()
    assert np.isfinite(float(proc.stdout.split("estimated time")[1].split()[0].replace(",", "")))


@pytest.mark.parametrize("args, error", [
    (["--n-tokens", "4000"], "N_TOKENS=4000 is too small: use at least 4096 tokens"),
    (["--rotations", "0"], "ROTATIONS=0 must be at least 1"),
    (["--parallel", "0"], "PARALLEL=0 must be at least 1"),
    (["--corr-memory", "lots"], "CORR_MEMORY='lots' is not a size"),
])
def test_plan_refuses_what_analyze_refuses_in_the_same_words(tmp_path, args, error):
    for command in ("plan", "analyze"):
        proc = cli_in_process(tmp_path / "store", command, "--models", "toy-zoo-mini", "--device", "cpu", *args)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {error}"), (command, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
