"""The correlation engine against numpy float64 on random and structured data, on all rows
and on each half of them (even and odd blocks of HALF_BLOCK_ROWS rows, or whole documents)."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from unlib.engine.engine import ExcessCorrelationEngine
from unlib.engine.halves import HALF_BLOCK_ROWS, MIN_HALF_ROWS, HalfSplit
from unlib.engine.memory import MemoryBudgetError
from unlib.engine.results import LayerResult, PassResult, collect, merge_partials
from unlib.engine.rotations import PHILOX_BLOCK, gaussian, haar_orthogonal, philox4x32

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


def chunks(data, size: int):
    """A chunk source for the engine: a fresh stream of `size`-token chunks per pass."""
    def stream(needed):
        n = data[0][0].shape[0]
        for start in range(0, n, size):
            yield [torch.from_numpy(np.concatenate([a[start:start + size] for a in model], axis=1))
                   for model in data]
    return stream


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("reference", [0, 2])
def test_max_correlation_matches_numpy(kind, reference):
    data = make_data(kind)
    engine = ExcessCorrelationEngine(LAYERS, reference, n_rotations=2, rotation_seed=7)
    results = engine.run(chunks(data, 337))[reference]  # uneven chunks exercise the Chan merge
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
    engine = ExcessCorrelationEngine(LAYERS, [0, 2], n_rotations=3, rotation_seed=11)
    results = engine.run(chunks(data, 512))[0]
    for result in results:
        x = data[0][result.layer]
        for k, m in enumerate(result.others):
            for r in range(3):
                rotated = [data[m][l].astype(np.float64) @ engine.rotation(m, l, r).double().numpy()
                           for l in range(len(LAYERS[m]))]
                expected = corr_block(x, np.concatenate(rotated, axis=1)).max(axis=1)
                assert np.abs(expected - result.baseline_max_corr[k, r]).max() <= 1e-4


def half_rows(n: int, half: int, split: HalfSplit | None = None) -> np.ndarray:
    """Row indices of half A (half 0) or half B (half 1): even or odd blocks, or with a split
    of documents, the rows of its groups in that half."""
    if split is None:
        return np.flatnonzero((np.arange(n) // HALF_BLOCK_ROWS) % 2 == half)
    group = np.searchsorted(split.starts, np.arange(n), side="right") - 1
    return np.flatnonzero(split.halves[group] == half)


def expected_max(data, reference: int, other: int, rows: np.ndarray, engine, n_rotations: int) -> np.ndarray:
    """numpy float64 max correlation, on `rows`, of every neuron of the reference model with
    the other model: [0] as is, [1 + r] with its layers rotated by the engine's rotation r."""
    y = [data[other][l][rows].astype(np.float64) for l in range(len(LAYERS[other]))]
    versions = [y] + [[a @ engine.rotation(other, l, r).double().numpy() for l, a in enumerate(y)]
                      for r in range(n_rotations)]
    x = np.concatenate(data[reference], axis=1)[rows]
    c = corr_block(x, np.concatenate([np.concatenate(v, axis=1) for v in versions], axis=1))
    return c.reshape(len(x.T), len(versions), -1).max(axis=2).T


# documents of 900-2,000 rows in 6,844: groups of at least 855 rows (1/8), and the document
# longer than 1,711 rows (a quarter) cut in two; halves A 900 + 1000 + 1500, B 1000 + 1100 + 1344
DOCUMENT_STARTS = np.array([0, 900, 2900, 4000, 5500])


@pytest.mark.parametrize("kind, chunk, passes, documents", [("random", 337, "one", False),
                                                            ("structured", 5000, "one", False),
                                                            ("structured", 1500, "several", False),
                                                            ("structured", 1500, "several", True)])
def test_each_half_matches_numpy_on_its_rows(kind, chunk, passes, documents):
    n = 3 * HALF_BLOCK_ROWS + 700  # blocks: half A blocks 0 and 2; half B block 1 and 700 rows of block 3
    split = HalfSplit.by_document(DOCUMENT_STARTS, n) if documents else HalfSplit()
    data = make_data(kind, n=n, seed=5)
    # "several": room for one unit's two halves of accumulators at a time, so later passes
    # see only some layers of their row model (the others are not read)
    budget = None
    if passes == "several":
        budget = ExcessCorrelationEngine(LAYERS, [0, 2], n_rotations=2).least_memory()
    engine = ExcessCorrelationEngine(LAYERS, [0, 2], n_rotations=2, rotation_seed=4, memory_budget=budget)
    assert (len(engine.passes) > 1) == (passes == "several")
    results = engine.run(chunks(data, chunk), split=split)  # chunk sizes that do not align with the blocks
    counts = [len(half_rows(n, h, split if documents else None)) for h in range(2)]
    assert engine.run_pass(chunks(data, chunk), engine.passes[-1], split=split).half_rows == counts
    assert counts == ([3400, 3444] if documents else [2 * HALF_BLOCK_ROWS, HALF_BLOCK_ROWS + 700])
    worst = 0.0
    for ref in (0, 2):
        offsets = np.cumsum([0] + LAYERS[ref])
        for m in [m for m in range(3) if m != ref]:
            for half, rows in [(h, half_rows(n, h, split if documents else None)) for h in range(2)] + [
                    (None, np.arange(n))]:
                expected = expected_max(data, ref, m, rows, engine, 2)
                for result in results[ref]:
                    k = result.others.index(m)
                    want = expected[:, offsets[result.layer]:offsets[result.layer + 1]]
                    got_max = result.max_corr[k] if half is None else result.max_corr_halves[half, k]
                    got_base = result.baseline_max_corr[k] if half is None else result.baseline_max_corr_halves[half, k]
                    worst = max(worst, np.abs(got_max - want[0]).max(), np.abs(got_base - want[1:]).max())
    assert worst <= 1e-4


def test_halves_need_enough_rows():
    short = make_data("random", n=HALF_BLOCK_ROWS + MIN_HALF_ROWS - 1)
    result = ExcessCorrelationEngine(LAYERS, 0, n_rotations=1).run(chunks(short, 1000))[0][1]
    assert np.isnan(result.max_corr_halves).all() and np.isnan(result.baseline_max_corr_halves).all()
    assert np.isfinite(result.max_corr).all() and np.isfinite(result.baseline_max_corr).all()
    enough = make_data("random", n=HALF_BLOCK_ROWS + MIN_HALF_ROWS)
    result = ExcessCorrelationEngine(LAYERS, 0, n_rotations=1).run(chunks(enough, 1000))[0][1]
    assert np.isfinite(result.max_corr_halves).all() and np.isfinite(result.baseline_max_corr_halves).all()


def test_constant_neuron_gets_zero_correlation():
    data = make_data("random")
    data[1][0][:, 0] = 3.0
    engine = ExcessCorrelationEngine(LAYERS, 1, n_rotations=1)
    result = engine.run(chunks(data, 1000))[1][0]
    assert np.all(result.max_corr[:, 0] == 0)
    assert np.isfinite(result.max_corr).all() and np.isfinite(result.baseline_max_corr).all()


def test_dead_reference_neuron_claims_no_best_match():
    """A reference neuron constant over the rows has no best match (layer and neuron -1, max and
    baseline 0) and is marked dead; a constant neuron of another model changes nothing else."""
    from unlib.engine.results import DEAD_MATCH
    from unlib.engine.tables import excess_tables

    data = make_data("structured", n=2 * HALF_BLOCK_ROWS + 500)  # both halves defined
    data[0][1][:, 7] = 0.1234  # dead in the reference (model 0, layer 1)
    data[2][0][:, 2] = -0.5  # dead in another model
    results = ExcessCorrelationEngine(LAYERS, 0, n_rotations=2).run(chunks(data, 700))[0]
    layer = results[1]
    assert np.all(layer.max_layer[:, 7] == DEAD_MATCH) and np.all(layer.max_neuron[:, 7] == DEAD_MATCH)
    assert np.all(layer.max_corr[:, 7] == 0) and np.all(layer.baseline_max_corr[:, :, 7] == 0)
    alive = np.arange(LAYERS[0][1]) != 7
    assert np.all(layer.max_layer[:, alive] >= 0) and np.all(results[0].max_layer >= 0)
    excess, pairwise = excess_tables(results, ["a", "b", "c"])
    assert excess["dead"].tolist() == [(l, n) == (1, 7) for l, n in zip(excess["layer"], excess["neuron"])]
    row = excess[excess["dead"]].iloc[0]
    assert row["excess_correlation"] == 0 and row["max_corr"] == 0
    assert np.isfinite(excess.drop(columns="dead").to_numpy(dtype=float)).all()
    dead_rows = pairwise[(pairwise["layer"] == 1) & (pairwise["neuron"] == 7)]
    assert (dead_rows["max_layer"] == -1).all() and (dead_rows["max_neuron"] == -1).all()


def test_all_references_in_one_pass_match_one_reference_at_a_time():
    data = make_data("structured")
    together = ExcessCorrelationEngine(LAYERS, [0, 1, 2], n_rotations=2, rotation_seed=3).run(chunks(data, 700))
    for ref in range(3):
        alone = ExcessCorrelationEngine(LAYERS, ref, n_rotations=2, rotation_seed=3).run(chunks(data, 700))[ref]
        for a, b in zip(together[ref], alone):
            assert a.others == b.others
            np.testing.assert_allclose(a.max_corr, b.max_corr, atol=1e-5)
            np.testing.assert_allclose(a.baseline_max_corr, b.baseline_max_corr, atol=1e-5)
            assert np.array_equal(a.max_layer, b.max_layer) and np.array_equal(a.max_neuron, b.max_neuron)


def test_a_small_memory_budget_splits_the_work_into_passes_with_the_same_numbers():
    data = make_data("random")
    roomy = ExcessCorrelationEngine(LAYERS, [0, 1, 2], n_rotations=2)
    assert len(roomy.passes) == 1
    # room for one row layer of the widest pair a pass
    tight_budget = roomy.least_memory()
    tight = ExcessCorrelationEngine(LAYERS, [0, 1, 2], n_rotations=2, memory_budget=tight_budget)
    assert len(tight.passes) > 3
    assert all(tight.pass_bytes(p) <= tight_budget for p in tight.passes)
    a, b = roomy.run(chunks(data, 500)), tight.run(chunks(data, 500))
    for ref in range(3):
        for x, y in zip(a[ref], b[ref]):
            np.testing.assert_allclose(x.max_corr, y.max_corr, atol=1e-5)
            np.testing.assert_allclose(x.baseline_max_corr, y.baseline_max_corr, atol=1e-5)
            assert np.array_equal(x.max_neuron, y.max_neuron)
    with pytest.raises(MemoryBudgetError, match="CORR_MEMORY"):
        ExcessCorrelationEngine(LAYERS, 0, memory_budget=ExcessCorrelationEngine(LAYERS, 0).least_memory() - 1)


def test_philox_gives_the_published_known_answers():
    # Random123's kat_vectors for Philox4x32-10: counter (4 words), key (2 words) -> 4 words
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        got = philox4x32(tuple(torch.tensor([w]) for w in counter), key)
        assert [int(w) for w in got] == list(want)


def test_gaussian_does_not_depend_on_the_block_size(monkeypatch):
    # A GPU runs the generator in larger blocks than a CPU: the numbers must not change with it.
    want = gaussian(300, [4, 5])
    monkeypatch.setitem(PHILOX_BLOCK, "cpu", 1000)
    assert torch.equal(gaussian(300, [4, 5]), want)
    z = gaussian(1000, [7]).double().numpy().ravel()
    assert abs(z.mean()) < 0.005 and abs(z.std() - 1) < 0.005 and abs((z ** 4).mean() - 3) < 0.03
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.005


def test_haar_draws_do_not_change_with_the_cpu_threads():
    # WORKERS sets each worker's torch threads: a run resumed with other WORKERS must draw the
    # same baselines (a float32 QR on the CPU would not)
    before = torch.get_num_threads()
    try:
        draws = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            draws.append(haar_orthogonal(512, [3, 1]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*draws)


def test_haar_matrices_are_orthogonal_and_reproducible():
    q = haar_orthogonal(64, [1, 2, 3]).double().numpy()
    assert np.abs(q.T @ q - np.eye(64)).max() < 1e-6
    assert np.abs(haar_orthogonal(1024, [1]).double().numpy().T @ haar_orthogonal(1024, [1]).double().numpy()
                  - np.eye(1024)).max() < 1e-5
    assert np.array_equal(q, haar_orthogonal(64, [1, 2, 3]).numpy())
    assert not np.allclose(q, haar_orthogonal(64, [1, 2, 4]).numpy())


def test_haar_matrices_have_haar_trace_moments():
    # For Haar-distributed O(n), E[tr Q] = 0 and E[(tr Q)^2] = 1. QR without the sign fix
    # gives E[tr Q] far from 0, so this catches a non-Haar sampler.
    traces = np.array([np.trace(haar_orthogonal(6, [s]).numpy()) for s in range(3000)])
    assert abs(traces.mean()) < 0.08
    assert abs((traces ** 2).mean() - 1) < 0.12


def same_results(a: dict, b: dict) -> bool:
    """Whether two engines' {reference: [LayerResult]} are bitwise equal (NaN equal to NaN)."""
    return a.keys() == b.keys() and all(
        x.layer == y.layer and x.others == y.others
        and all(np.array_equal(getattr(x, n), getattr(y, n), equal_nan=True) for n in LayerResult.ARRAYS)
        for ref in a for x, y in zip(a[ref], b[ref], strict=True))


@pytest.mark.parametrize("references", [[0], [0, 1, 2]])
def test_groups_run_apart_and_merged_in_plan_order_equal_one_engine_bitwise(references, tmp_path):
    """Each group is one task's pass (saved and loaded as a file); merged in plan order they give
    exactly the one-engine result, whatever the number of groups, also with a dead reference
    neuron and exact ties (copied neurons)."""
    data = make_data("structured", n=2 * HALF_BLOCK_ROWS + 500, seed=3)
    data[0][1][:, 2] = 1.5
    one = ExcessCorrelationEngine(LAYERS, references, n_rotations=2, rotation_seed=5).run(chunks(data, 700))
    plan = ExcessCorrelationEngine(LAYERS, references, n_rotations=2, rotation_seed=5)
    rows = [(u.row_model, l, u.col_model) for p in plan.passes for u in p for l in u.row_layers]
    for parallel in (1, 2, 3, len(rows) + 5):
        groups = plan.groups(parallel)
        assert len(groups) == min(parallel, len(rows))
        assert [(u.row_model, l, u.col_model) for g in groups for u in g for l in u.row_layers] == rows
        best: dict = {}
        for number, units in enumerate(groups):
            engine = ExcessCorrelationEngine(LAYERS, references, n_rotations=2, rotation_seed=5)
            result = engine.run_pass(chunks(data, 700), units)
            result.save(tmp_path / f"{number}.h5", {})
            merge_partials(best, PassResult.load(tmp_path / f"{number}.h5").entries)
        assert same_results(one, collect(best, LAYERS, references, result.half_rows)), parallel


def test_several_passes_equal_one_pass_bitwise():
    data = make_data("structured")
    roomy = ExcessCorrelationEngine(LAYERS, [0, 2], n_rotations=2)
    tight = ExcessCorrelationEngine(LAYERS, [0, 2], n_rotations=2, memory_budget=roomy.least_memory())
    assert len(roomy.passes) == 1 and len(tight.passes) > 3
    assert same_results(roomy.run(chunks(data, 500)), tight.run(chunks(data, 500)))


def test_one_group_per_pass_for_one_task_and_no_more_groups_than_row_layers():
    roomy = ExcessCorrelationEngine(LAYERS, 0, n_rotations=1)
    assert roomy.groups(1) == roomy.passes and len(roomy.passes) == 1
    tight = ExcessCorrelationEngine(LAYERS, 0, n_rotations=1, memory_budget=roomy.least_memory())
    assert tight.groups(1) == tight.passes and tight.groups(2) == tight.passes  # already 4 passes
    assert len(roomy.groups(100)) == 4  # two pairs x two row layers: the finest split
    assert [len(g) for g in roomy.groups(2)] == [1, 1]  # one pair each


def same_entries(a: PassResult, b: PassResult) -> bool:
    """Whether two passes' partial best matches and row counts are bitwise equal."""
    return a.half_rows == b.half_rows and a.entries.keys() == b.entries.keys() and all(
        np.array_equal(a.entries[key][name], b.entries[key][name]) for key in a.entries for name in PassResult.FIELDS)


def test_passes_interleaved_on_one_engine_equal_each_pass_alone():
    """The engine keeps no pass state: a pass run inside another's stream, or two passes
    streaming chunk by chunk in turn from two threads, give each pass's result alone."""
    data = make_data("structured", n=2 * HALF_BLOCK_ROWS + 500, seed=2)
    engine = ExcessCorrelationEngine(LAYERS, [0, 2], n_rotations=2, rotation_seed=9)
    first, second = engine.groups(2)
    alone = [ExcessCorrelationEngine(LAYERS, [0, 2], n_rotations=2, rotation_seed=9).run_pass(chunks(data, 700), g)
             for g in (first, second)]

    inner = []

    def feed_running_the_other_pass(needed):
        for number, chunk in enumerate(chunks(data, 700)(needed)):
            if number == 1:
                inner.append(engine.run_pass(chunks(data, 700), second))
            yield chunk
    outer = engine.run_pass(feed_running_the_other_pass, first)
    assert same_entries(outer, alone[0]) and same_entries(inner[0], alone[1])

    turns = threading.Barrier(2, timeout=120)

    def in_turn(needed):
        for chunk in chunks(data, 700)(needed):
            turns.wait()
            yield chunk
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda units: engine.run_pass(in_turn, units), (first, second)))
    assert same_entries(both[0], alone[0]) and same_entries(both[1], alone[1])
