"""Universal neurons against the rest: the Mann-Whitney p-value against an exact permutation
test enumerated by hand, Cliff's delta against all pairs, Holm's correction against hand
numbers, and the verdict on planted differences."""
import itertools

import numpy as np
import pandas as pd
import pytest

from unlib.contrasts import differences_sentence, holm, universal_vs_rest


def test_holm_against_hand_numbers():
    # sorted 0.01, 0.02, 0.04 (m = 3): 0.03, 0.04, 0.04 (made non-decreasing); NaN untested
    adjusted = holm(np.array([0.04, 0.01, np.nan, 0.02]))
    assert adjusted[[1, 3, 0]] == pytest.approx([0.03, 0.04, 0.04]) and np.isnan(adjusted[2])
    assert holm(np.array([0.5, 0.9])) == pytest.approx([1.0, 1.0])


def frame(values: dict[str, np.ndarray]) -> pd.DataFrame:
    n = len(next(iter(values.values())))
    return pd.DataFrame({"layer": np.zeros(n, int), "neuron": np.arange(n), **values})


def test_p_value_and_effect_size_against_enumeration():
    a = np.array([3.1, 4.0, 5.2, 6.3])  # universal: neurons 0-3
    b = np.array([1.0, 2.2, 3.5, 0.4, 2.9, 4.4])
    stats = frame({"x": np.concatenate([a, b])})
    (row,) = universal_vs_rest(stats, stats.iloc[:4]).itertuples()
    pairs = [int(x > y) - int(x < y) for x in a for y in b]
    assert row.cliffs_delta == pytest.approx(np.mean(pairs))  # P(a > b) - P(a < b)
    # the exact two-sided test: how often a random split of the 10 values into 4 and 6 gives a
    # rank sum at least as far from its mean as the observed one
    values = np.concatenate([a, b])
    ranks = values.argsort().argsort() + 1
    observed = abs(ranks[:4].sum() - 4 * 11 / 2)
    sums = [abs(ranks[list(c)].sum() - 22) for c in itertools.combinations(range(10), 4)]
    assert row.p == pytest.approx(np.mean([s >= observed - 1e-9 for s in sums]))
    assert (row.n_universal, row.n_rest) == (4, 6) and row.universal_median == pytest.approx(4.6)


def test_planted_differences_and_dead_neurons():
    rng = np.random.default_rng(0)
    n = 400
    universal = np.arange(40)
    shifted = rng.normal(size=n)
    shifted[universal] += 1.5  # the universal neurons are higher
    stats = frame({"shifted": shifted, "same": rng.normal(size=n), "lower": -shifted})
    excess = stats[["layer", "neuron"]].assign(dead=stats["neuron"] >= 300)  # 100 dead neurons: left out
    table = universal_vs_rest(stats, stats.iloc[universal], excess).set_index("statistic")
    assert table.loc["shifted", "n_rest"] == 260 and table.loc["shifted", "n_universal"] == 40
    assert table.loc["shifted", "differs"] and table.loc["shifted", "cliffs_delta"] > 0.5
    assert table.loc["lower", "differs"] and table.loc["lower", "cliffs_delta"] < -0.5
    assert not table.loc["same", "differs"]
    assert table["p_holm"].to_numpy() == pytest.approx(holm(table["p"].to_numpy()))
    sentence = differences_sentence(table.reset_index())
    assert "shifted (higher" in sentence and "lower (lower" in sentence and "same" not in sentence


def test_null_statistics_are_rarely_called_different():
    """Under the null (universal neurons drawn at random) the family-wise error of the
    Holm-corrected verdict stays near 5 % or below across 200 simulated runs of 8 statistics."""
    rng = np.random.default_rng(1)
    called = 0
    for _ in range(200):
        stats = frame({f"s{i}": rng.standard_t(3, size=300) for i in range(8)})
        table = universal_vs_rest(stats, stats.sample(30, random_state=int(rng.integers(1 << 30))))
        called += bool(table["differs"].any())
    assert called / 200 <= 0.09
