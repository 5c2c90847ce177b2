"""The correlation engine against numpy float64 on random and structured data."""
import numpy as np
import pytest
import torch

from unlib.correlation import ExcessCorrelationEngine, haar_orthogonal

LAYERS = [[12, 20], [12, 20], [16, 8, 8]]


def corr_block(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of x with every column of y, float64."""
    full = np.corrcoef(x.T.astype(np.float64), y.T.astype(np.float64))
    return full[: x.shape[1], x.shape[1]:]


def make_data(kind: str, n: int = 3000, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return [[rng.normal(size=(n, d)).astype(np.float32) for d in sizes] for sizes in LAYERS]
    # Structured: shared low-rank signal, large offsets (cancellation risk for E[xy]-E[x]E[y]),
    # heavy-tailed sparse neurons, and exact copies across models.
    latent = rng.normal(size=(n, 6))
    data = []
    for sizes in LAYERS:
        layers = []
        for d in sizes:
            mix = rng.normal(size=(6, d))
            act = latent @ mix + 0.3 * rng.normal(size=(n, d)) + 200.0
            act[:, : d // 4] = np.maximum(act[:, : d // 4] - 201.0, 0) ** 2
            layers.append(act.astype(np.float32))
        data.append(layers)
    data[1][0][:, 3] = data[0][1][:, 5]
    return data


def feed(engine: ExcessCorrelationEngine, data, chunk: int) -> None:
    n = data[0][0].shape[0]
    for start in range(0, n, chunk):
        engine.update([[torch.from_numpy(a[start:start + chunk]) for a in model] for model in data])


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("reference", [0, 2])
def test_max_correlation_matches_numpy(kind, reference):
    data = make_data(kind)
    engine = ExcessCorrelationEngine(LAYERS, reference=reference, n_rotations=2, rotation_seed=7)
    feed(engine, data, chunk=337)  # uneven chunks exercise the Chan merge
    results = engine.results()
    worst = 0.0
    for result in results:
        x = data[reference][result.layer]
        for k, m in enumerate(result.others):
            c = corr_block(x, np.concatenate(data[m], axis=1))
            worst = max(worst, np.abs(c.max(axis=1) - result.max_corr[k]).max())
            flat = np.cumsum([0] + LAYERS[m])[result.max_layer[k]] + result.max_neuron[k]
            chosen = c[np.arange(c.shape[0]), flat]
            assert np.allclose(chosen, c.max(axis=1), atol=1e-4)
    assert worst <= 1e-4


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_rotated_baseline_matches_explicit_rotation(kind):
    data = make_data(kind)
    engine = ExcessCorrelationEngine(LAYERS, reference=0, n_rotations=3, rotation_seed=11)
    feed(engine, data, chunk=512)
    results = engine.results()
    for result in results:
        x = data[0][result.layer]
        for k, m in enumerate(result.others):
            for r in range(3):
                rotated = [data[m][l].astype(np.float64) @ engine.rotation(m, l, r).double().numpy()
                           for l in range(len(LAYERS[m]))]
                expected = corr_block(x, np.concatenate(rotated, axis=1)).max(axis=1)
                assert np.abs(expected - result.baseline_max_corr[k, r]).max() <= 1e-4


def test_constant_neuron_gets_zero_correlation():
    data = make_data("random")
    data[1][0][:, 0] = 3.0
    engine = ExcessCorrelationEngine(LAYERS, reference=1, n_rotations=1)
    feed(engine, data, chunk=1000)
    result = engine.results()[0]
    assert np.all(result.max_corr[:, 0] == 0)
    assert np.isfinite(result.max_corr).all() and np.isfinite(result.baseline_max_corr).all()


def test_haar_matrices_are_orthogonal_and_reproducible():
    q = haar_orthogonal(64, [1, 2, 3]).numpy()
    assert np.abs(q.T @ q - np.eye(64)).max() < 1e-12
    assert np.array_equal(q, haar_orthogonal(64, [1, 2, 3]).numpy())
    assert not np.allclose(q, haar_orthogonal(64, [1, 2, 4]).numpy())


def test_haar_matrices_have_haar_trace_moments():
    # For Haar-distributed O(n), E[tr Q] = 0 and E[(tr Q)^2] = 1. QR without the sign fix
    # gives E[tr Q] far from 0, so this catches a non-Haar sampler.
    traces = np.array([np.trace(haar_orthogonal(6, [s]).numpy()) for s in range(3000)])
    assert abs(traces.mean()) < 0.08
    assert abs((traces ** 2).mean() - 1) < 0.12
