"""bench/'s reference, the paper's streaming Pearson algorithm, against numpy float64, so
that `make bench` compares the engine with a correct implementation of it; and the GPU
section of `make bench` (DEVICE=cuda), run on the CPU at small shapes."""
import numpy as np
import torch

from bench.reference import paper_max_correlations
from unlib.engine.rotations import haar_orthogonal

SIZES = [[6, 10], [8, 8], [5, 7]]


def test_paper_algorithm_matches_numpy_with_and_without_rotation():
    rng = np.random.default_rng(3)
    n = 1000
    latent = rng.normal(size=(n, 4))
    data = [np.maximum(latent @ rng.normal(size=(4, sum(s))) + rng.normal(size=(n, sum(s))) + 5.0, 0)
            .astype(np.float32) for s in SIZES]

    def batches():
        for start in range(0, n, 300):  # uneven last batch
            yield [torch.from_numpy(a[start:start + 300]) for a in data]

    rotations = [{(m, l): haar_orthogonal(d, [m, l, r]).float() for m, s in enumerate(SIZES) for l, d in enumerate(s)}
                 for r in range(2)]
    result = paper_max_correlations(batches, SIZES, rotations, reference=1)
    assert sorted(result) == [0, 2]
    x = data[1].astype(np.float64)
    for other, (plain, rotated) in result.items():
        y = data[other].astype(np.float64)
        versions = [y] + [np.concatenate([layer @ rotations[r][(other, l)].double().numpy() for l, layer in
                                          enumerate(np.split(y, np.cumsum(SIZES[other])[:-1], axis=1))], axis=1)
                          for r in range(2)]
        for got, y_version in zip([plain, *rotated], versions):
            expected = np.corrcoef(x.T, y_version.T)[:x.shape[1], x.shape[1]:].max(axis=1)
            assert np.abs(got.numpy() - expected).max() < 1e-5


def test_the_gpu_section_runs_on_the_cpu_at_small_shapes(tmp_path):
    """make bench DEVICE=cuda's section, on the CPU at small shapes: every mode's error against
    float64 within its documented bound, rates for every mode, a default chosen among the modes
    within 1e-3, an orthogonal Haar draw, projections that grow tenfold with the tokens' stream,
    and an end-to-end analysis of five random-weight models, stage by stage."""
    from bench.run import PAPER_RUNS, device_section
    from unlib.engine.precision import DOCUMENTED_ERROR, ERROR_BOUND, default_precision, runnable_precisions
    from unlib.memory_check import Shape

    section = device_section("cpu", [[128] * 2] * 2, 4096, error_tokens=8192, seconds=0.2,
                             pipeline_shape=Shape(5, 2, 128, 64, 128), pipeline_tokens=4096,
                             profile_path=tmp_path / "profile.txt")
    assert list(section["errors"]) == list(section["rates"]) == runnable_precisions("cpu")
    for mode in runnable_precisions("cpu"):
        errors = section["errors"][mode]
        assert max(errors["max_corr_error"], errors["baseline_error"]) <= DOCUMENTED_ERROR[mode], (mode, errors)
        assert section["rates"][mode]["stream_gflops"] > 0 and 0 <= section["rates"][mode]["rotation_share"] < 1
    chosen = section["errors"][section["measured_default"]]
    assert max(chosen["max_corr_error"], chosen["baseline_error"]) < ERROR_BOUND
    assert set(section["projected_correlation"]) == set(PAPER_RUNS)
    for hours in section["projected_correlation"].values():
        assert 5 < hours["100M_tokens_hours"] / hours["10M_tokens_hours"] <= 10
    assert section["rotation_draw"]["n"] == 128 and section["rotation_draw"]["orthogonality"] < 1e-5
    pipeline = section["pipeline"]
    assert list(pipeline["seconds"]) == ["tokenize", "forward", "correlation", "statistics", "rest"]
    assert all(v > 0 for v in pipeline["seconds"].values())
    assert pipeline["forward_tokens_per_s"] == 5 * 4096 / pipeline["seconds"]["forward"]
    assert pipeline["precision"]["mode"] == default_precision("cpu") and 0 < pipeline["rotation_share"] < 1
    profile = section["profile"]
    assert 0 < profile["products_share"] <= 1 and 0 < profile["busy_share"] <= 1.05
    assert any("addmm" in name for name, _, _ in profile["top"]) and "addmm" in (tmp_path / "profile.txt").read_text()
