"""The split-half error of the excess correlation: its definition, its coverage of a known
population excess on planted data, and the split-half Jaccard of universal sets."""
import numpy as np
import pandas as pd
import pytest
import torch

from unlib.engine.engine import ExcessCorrelationEngine
from unlib.engine.layout import HALF_BLOCK_ROWS
from unlib.engine.results import LayerResult
from unlib.engine.tables import SPLIT_HALF_COLUMNS, excess_tables
from unlib.selection import jaccard_index, split_half_jaccard, split_half_sets


def test_interval_follows_its_definition():
    # one layer of 4 neurons, 2 other models, 2 rotations; full and half values chosen by hand
    max_corr = np.array([[0.9, 0.5, 0.3, 0.2], [0.7, 0.5, 0.1, 0.2]])
    baseline = np.full((2, 2, 4), 0.1)
    halves = np.stack([max_corr + 0.02, max_corr - np.array([0.02, 0.0, 0.2, 0.0])])  # [half, other, neuron]
    result = LayerResult(0, [1, 2], max_corr, np.zeros((2, 4), int), np.zeros((2, 4), int), baseline,
                         halves, np.stack([baseline, baseline]))
    excess, _ = excess_tables([result], ["a", "b", "c"])
    assert list(excess.columns[-6:]) == SPLIT_HALF_COLUMNS + ["dead"] and not excess["dead"].any()
    full = np.array([0.7, 0.4, 0.1, 0.1])
    np.testing.assert_allclose(excess["excess_correlation"], full)
    np.testing.assert_allclose(excess["excess_half_a"], full + 0.02)
    np.testing.assert_allclose(excess["excess_half_b"], full - [0.02, 0.0, 0.2, 0.0])
    per_neuron = np.array([0.02, 0.01, 0.11, 0.01])  # |a - b| / 2
    pooled = np.sqrt(np.mean(per_neuron ** 2))  # 0.0570
    se = np.maximum(per_neuron, pooled)  # [pooled, pooled, 0.11, pooled]
    np.testing.assert_allclose(excess["excess_se"], se)
    np.testing.assert_allclose(excess["excess_ci_low"], full - 1.96 * se)
    np.testing.assert_allclose(excess["excess_ci_high"], full + 1.96 * se)


def test_interval_covers_the_population_excess_of_planted_correlations():
    """Model 0 and model 1 have 2 layers of 64 standard Gaussian neurons; neuron i of each
    layer of model 1 is rho x_i + sqrt(1 - rho^2) z_i, x_i being the same neuron of model 0;
    every other pair is independent. Every neuron of model 1 has unit variance and they are
    independent, so rotating a layer of model 1 by the engine's Q (activations y Q: rotated
    neuron j is sum_k y_k Q[k, j]) keeps unit variances and gives corr(x_i, rotated j) =
    rho Q[i, j]; the other layer's neurons stay uncorrelated with x_i. Population values:
    max corr rho (j = i), rotated max corr rho max_j Q[i, j] (> 0), so the population
    excess is rho (1 - mean over rotations r of max_j Q_r[i, j]).

    Coverage expected: the halves are equal (20 blocks), so (a - b) / 2 estimates the full
    estimate's error with the right variance but one degree of freedom; with se_i alone the
    95 % interval covers with probability P(|t_1| <= 1.96) = 0.70. The layer-pooled floor
    se_L has ~64 degrees of freedom (the neurons are exchangeable), so max(se_i, se_L)
    covers at least ~95 % (more, where se_i > se_L), less a little for the upward bias of a
    max over noisy correlations in the baseline. Over 8 data seeds the fraction was
    0.90-0.98 (mean 0.95); 0.85 leaves ~4 binomial standard deviations below the mean."""
    d, layers, rho, n = 64, 2, 0.6, 20 * HALF_BLOCK_ROWS
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d * layers))
    y = rho * x + np.sqrt(1 - rho ** 2) * rng.standard_normal((n, d * layers))
    data = [torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))]

    def chunks(needed):
        for start in range(0, n, 3000):  # not a multiple of the block size
            yield [a[start:start + 3000] for a in data]

    engine = ExcessCorrelationEngine([[d] * layers] * 2, 0, n_rotations=5)
    excess, _ = excess_tables(engine.run(chunks)[0], ["m0", "m1"])
    # model 1 (the other model) is the rotated one
    truth = np.concatenate([rho * (1 - np.mean([engine.rotation(1, l, r).double().numpy().max(axis=1)
                                                for r in range(5)], axis=0)) for l in range(layers)])
    covered = (excess["excess_ci_low"] <= truth) & (truth <= excess["excess_ci_high"])
    assert covered.mean() >= 0.85, covered.mean()
    # the interval is informative, not just wide: its standard error matches the spread of
    # the actual errors, and the one-degree-of-freedom per-neuron error alone undercovers
    error = excess["excess_correlation"] - truth
    assert 0.5 * error.std() <= excess["excess_se"].median() <= 2 * error.std()
    per_neuron = (excess["excess_half_a"] - excess["excess_half_b"]).abs() / 2
    assert (error.abs() <= 1.96 * per_neuron).mean() < 0.85


def table(scores: dict[tuple[int, int], tuple[float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"layer": l, "neuron": n, "excess_correlation": (a + b) / 2, "excess_half_a": a,
                          "excess_half_b": b} for (l, n), (a, b) in scores.items()])


def test_split_half_jaccard_against_hand_computation():
    scores = table({(0, 0): (0.6, 0.7), (0, 1): (0.55, 0.2), (0, 2): (0.1, 0.52), (1, 0): (0.9, 0.8),
                    (1, 1): (0.3, 0.35), (1, 2): (0.5, 0.49)})
    a, b = split_half_sets(scores, 0.5)
    assert a == {(0, 0), (0, 1), (1, 0), (1, 2)} and b == {(0, 0), (0, 2), (1, 0)}
    assert split_half_jaccard(scores, 0.5) == pytest.approx(2 / 5)
    # top 2 on each half: {(1,0), (0,0)} and {(1,0), (0,0)}
    assert split_half_jaccard(scores, 0.5, top_k=2) == 1.0
    # top 3: A adds (0,1) (0.55), B adds (0,2) (0.52)
    assert split_half_jaccard(scores, 0.5, top_k=3) == pytest.approx(2 / 4)
    assert np.isnan(split_half_jaccard(scores, 0.95)) and jaccard_index(set(), {(0, 1)}) == 0


def test_undefined_halves_select_nothing():
    scores = table({(0, 0): (np.nan, np.nan), (0, 1): (np.nan, np.nan)})
    assert split_half_sets(scores, 0.1, top_k=1) == (set(), set())
