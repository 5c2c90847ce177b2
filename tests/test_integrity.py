"""No damage ever becomes a result: a full disk, a flipped byte in any store file, a rebuilt
input and a damaged cache read by the report each end in a one-line refusal or in the
reference run's CSVs, byte for byte. Files are damaged by editing the bytes HDF5 stores."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, analyzed_store
from unlib.h5checksums import CHECKSUMS
from unlib.h5read import DamagedFile, H5Reader, h5_problem, read_h5
from unlib.h5write import PartialH5, checked_writes, partial_path, write_h5
from unlib.store import StoreWriteError

MODELS = "toy-zoo-mini"
ARGS = ["--models", MODELS, "--checkpoint", "300", "--n-tokens", "8192", "--device", "cpu", "--scheduler", "local"]
RESULTS = Path("results") / MODELS / "checkpoint-300_n_tokens-8192"
CSVS = ["excess_correlation_scores.csv", "pairwise_correlations.csv", "neuron_stats.csv", "universal_neurons.csv"]
PRODUCTS = ("tokens", "activations", "correlation", "stats", "results")  # what the pipeline makes from the zoo


def flip_byte(path: Path, dataset: str, index: int = 0, offset: int = 0) -> None:
    """Flip one bit of chunk `index` (or of the contiguous data) of `dataset`, as stored."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        start = ds.id.get_chunk_info(index).byte_offset if ds.chunks else ds.id.get_offset()
    with open(path, "r+b") as f:
        f.seek(start + offset)
        value = f.read(1)[0]
        f.seek(start + offset)
        f.write(bytes([value ^ 0x04]))


def zero_chunk(path: Path, dataset: str, index: int) -> None:
    """Overwrite a stored chunk and its fletcher32 checksum with zeros: what a write that never
    reached the disk leaves (zeros pass HDF5's own check)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(index)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(bytes(info.size))


def aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.refused-*"))


def write_cache(path: Path, values: np.ndarray) -> None:
    writer = PartialH5(path, {"layer_000": (values.shape, "float32", (128, values.shape[1]))}, {"provenance": "p"})
    for start in range(0, len(values), 100):  # writes that do not end on chunk boundaries
        writer.write_rows(start, {"layer_000": values[start:start + 100]})
    writer.finish()
    writer.close()


def test_small_files_refuse_a_flipped_byte_and_are_set_aside(tmp_path):
    path = tmp_path / "tokens.h5"
    tokens = np.arange(640, dtype=np.int32).reshape(10, 64)
    write_h5(path, {"tokens": tokens, "keep": tokens % 3 > 0}, {"provenance": "p"})
    arrays, attrs = read_h5(path)
    assert np.array_equal(arrays["tokens"], tokens) and attrs["provenance"] == "p"
    assert h5_problem(path, "p") is None
    flip_byte(path, "tokens", offset=4 * 17)  # token 17: 17 -> 21
    assert h5_problem(path, "p") == ("damaged", "tokens rows from 0 do not match their checksum")
    with pytest.raises(DamagedFile, match="tokens.h5 is damaged .tokens rows from 0 do not match their checksum.; "
                                          "set it aside as tokens.h5.refused-"):
        read_h5(path)
    assert not path.exists() and len(aside(path)) == 1


def test_a_cache_chunk_that_never_reached_the_disk_is_refused(tmp_path):
    path = tmp_path / "cache.h5"
    values = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
    write_cache(path, values)
    with H5Reader(path) as reader:
        assert reader.unit_rows("layer_000") == 128
        assert np.array_equal(reader.read("layer_000"), values)
        assert np.array_equal(reader.read("layer_000", 130, 300), values[130:300])
    zero_chunk(path, "layer_000", 3)
    with h5py.File(path, "r") as f:  # HDF5's fletcher32 accepts the zeros
        assert not f["layer_000"][3 * 128:4 * 128].any()
    with H5Reader(path) as reader:
        assert np.array_equal(reader.read("layer_000", 0, 384), values[:384])  # the chunks before are fine
        with pytest.raises(DamagedFile, match=r"layer_000 rows from 384 do not match their checksum"):
            reader.read("layer_000", 300, 500)
    assert len(aside(path)) == 1


def test_a_partial_cache_resumes_mid_chunk_with_the_same_checksums(tmp_path):
    values = np.random.default_rng(1).standard_normal((1000, 16)).astype(np.float32)
    whole, resumed = tmp_path / "whole.h5", tmp_path / "resumed.h5"
    write_cache(whole, values)
    spec = {"layer_000": (values.shape, "float32", (128, 16))}
    writer = PartialH5(resumed, spec, {"provenance": "p"})
    writer.write_rows(0, {"layer_000": values[:300]})
    writer.close()  # killed: 256 rows (two whole chunks) count as written
    writer = PartialH5(resumed, spec, {"provenance": "p"})
    assert writer.rows_done == 256
    writer.write_rows(200, {"layer_000": values[200:]})  # from the sequence holding row 256
    writer.finish()
    with h5py.File(whole, "r") as a, h5py.File(resumed, "r") as b:
        assert np.array_equal(a["layer_000" + CHECKSUMS][:], b["layer_000" + CHECKSUMS][:])
    assert np.array_equal(read_h5(resumed)[0]["layer_000"], values)


def test_an_error_hdf5_only_reports_while_freeing_an_object_fails_the_write(tmp_path):
    class FailsWhenFreed:
        def __del__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(StoreWriteError, match=r"cannot write .*x.h5: the disk is full \("):
        with checked_writes(tmp_path / "x.h5"):
            FailsWhenFreed()


@pytest.fixture
def small_disk(tmp_path):
    """resize(megabytes): a tmpfs of that size mounted at the returned folder (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def resize(megabytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(mount)], check=True)

    yield mount, resize
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_writer_before_hdf5_meets_it_and_the_file_resumes(small_disk):
    mount, resize = small_disk
    path = mount / "cache.h5"
    values = np.random.default_rng(2).standard_normal((40960, 256)).astype(np.float32)  # 40 MiB
    spec = {"layer_000": (values.shape, "float32", (512, 256))}
    writer = PartialH5(path, spec, {"provenance": "p"})
    with pytest.raises(StoreWriteError, match=r"cannot write .*cache.partial.h5: the disk is full \(0.0\d GiB free "
                                              r"under .*disk; it needs about 0.0\d GiB\); free space or point "
                                              r"UNLIB_STORE at a larger disk"):
        for start in range(0, len(values), 2048):
            writer.write_rows(start, {"layer_000": values[start:start + 2048]})
    done = writer.rows_done
    writer.close()
    assert not path.exists() and 0 < done < len(values)
    resize(80)  # space freed: the same writer resumes where it stopped
    writer = PartialH5(path, spec, {"provenance": "p"})
    assert writer.rows_done == done
    writer.write_rows(done, {"layer_000": values[done:]})
    writer.finish()
    assert np.array_equal(read_h5(path)[0]["layer_000"], values)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mini_zoo):
    return analyzed_store(tmp_path_factory, mini_zoo, "integrity-reference", *ARGS)


def analyze(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks", "analyze", *ARGS, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"})


def same_csvs(store: Path, reference: Path) -> bool:
    return all((store / RESULTS / n).read_bytes() == (reference / RESULTS / n).read_bytes() for n in CSVS)


def copy_of(reference: Path, into: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(reference, into, ignore=shutil.ignore_patterns("locks"))
    for name in drop:
        shutil.rmtree(into / name)
    return into


# The command line, with the disk filled up (by a file FILLER) once the first activation cache
# has written its first rows: the full disk of the trial, met mid-write.
FILL_DISK_MID_CACHE = """
import errno, os, sys
import unlib.h5write as h5write
from tasks.__main__ import main
write = h5write.PartialH5._write
def filling_write(self, whole_units_only):
    if self.rows_done > 0 and not os.path.exists(os.environ["FILLER"]):
        fd = os.open(os.environ["FILLER"], os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, bytes(2**20)):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
    return write(self, whole_units_only)
h5write.PartialH5._write = filling_write
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_full_disk_during_caching_is_one_line_then_the_same_results(small_disk, reference, mini_zoo):
    mount, resize = small_disk
    resize(200)
    store, filler = mount / "store", mount / "filler"
    shutil.copytree(mini_zoo, store / "zoo")
    proc = subprocess.run([sys.executable, "-c", FILL_DISK_MID_CACHE, "analyze", *ARGS], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1",
                                                       "FILLER": str(filler)})
    assert filler.exists()
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write ") and ".partial.h5: the disk is full" in last, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    for cache in store.glob("activations/*/*/*.h5"):  # what was finished reads back as written
        if not cache.name.endswith(".partial.h5"):
            read_h5(cache)
    filler.unlink()
    proc = analyze(store)
    assert proc.returncode == 0, proc.stderr
    assert same_csvs(store, reference)


def test_a_flipped_byte_in_an_input_is_set_aside_and_rebuilt(reference, tmp_path):
    # the files made from the damaged ones are gone, so the run reads them: a token id flipped
    # before caching (the 86 -> 87 case) and a byte of a correlation block before the merge
    store = copy_of(reference, tmp_path / "store", ("activations", "stats", "results"))
    tokens = next(store.glob("tokens/*/*.h5"))
    flip_byte(tokens, "tokens", offset=4 * 100)
    for made in [*store.glob("correlation/*/*/layer_*.h5"), *store.glob("correlation/*/*/*.csv")]:
        made.unlink()
    block = next(store.glob("correlation/*/blocks/*.h5"))
    with h5py.File(block, "r") as f:
        first = next(n for n in sorted(f["0/0"]))
    flip_byte(block, f"0/0/{first}/max", offset=5)
    proc = analyze(store)
    assert proc.returncode == 0, proc.stderr
    for path in (tokens, block):
        assert f"refusing {path}" in proc.stderr and len(aside(path)) == 1, proc.stderr
    assert "do not match their checksum" in proc.stderr
    assert same_csvs(store, reference)


def test_a_rebuilt_table_invalidates_what_was_made_from_it(reference, tmp_path):
    store = copy_of(reference, tmp_path / "store")
    excess = next(store.glob("correlation/*/*/excess_correlation_scores.csv"))
    # a new version of a layer's correlations (whole and checksummed, as a rebuild from other
    # caches would write it): the shared excess table and every results file made from it follow
    layer_file = excess.parent / "layer_001.h5"
    arrays, attrs = read_h5(layer_file)
    arrays["max_corr"][:, 7] = 0.99
    layer_file.unlink()
    write_h5(layer_file, arrays, attrs)
    proc = analyze(store, "--threshold", "0.25")
    assert proc.returncode == 0, proc.stderr
    threshold_results = store / "results" / MODELS / "checkpoint-300_n_tokens-8192_threshold-0.25"
    assert (threshold_results / "excess_correlation_scores.csv").read_bytes() == excess.read_bytes()
    assert excess.read_bytes() != (reference / RESULTS / "excess_correlation_scores.csv").read_bytes()
    proc = analyze(store)  # the default run's folder was made from the old table: rebuilt too
    assert proc.returncode == 0, proc.stderr
    assert (store / RESULTS / "excess_correlation_scores.csv").read_bytes() == excess.read_bytes()
    assert "excess_correlation_scores.csv, which it was made from, was rebuilt since" in proc.stderr


def test_a_damaged_reference_cache_does_not_break_the_report(reference, tmp_path):
    store = copy_of(reference, tmp_path / "store")
    cache = next(store.glob(f"activations/{MODELS}-*--seed-0/*/*.h5"))
    flip_byte(cache, "layer_000", index=1, offset=9)
    proc = analyze(store, "--threshold", "0.25")  # a new report: its neuron cards read the cache
    assert proc.returncode == 0, proc.stderr
    # a cache this small is verified whole when the report asks whether it exists (a large one by
    # the read itself: test_a_cache_chunk_that_never_reached_the_disk_is_refused)
    assert f"refusing {cache}: layer_000: " in proc.stderr  # here HDF5's own fletcher32 check saw it first
    assert "Traceback" not in proc.stderr and len(aside(cache)) == 1
    results = store / "results" / MODELS / "checkpoint-300_n_tokens-8192_threshold-0.25"
    assert (results / "report.html").exists()
    for name in CSVS[:3]:
        assert (results / name).read_bytes() == (reference / RESULTS / name).read_bytes()


def fuzz(reference: Path, tmp_path: Path, rounds: int, seed: int) -> None:
    """Flip a random byte of a random store file, run again: the run either refuses in one line
    (and the next run gives the reference CSVs) or gives the reference CSVs itself."""
    rng = random.Random(seed)
    store = copy_of(reference, tmp_path / "store")
    for round_ in range(rounds):
        files = sorted(p for part in PRODUCTS for p in (store / part).rglob("*") if p.is_file() and p.stat().st_size)
        path = rng.choice(files)
        raw = bytearray(path.read_bytes())
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(raw))
        if round_ % 2:  # the results made again from the intermediate files
            shutil.rmtree(store / "results")
        proc = analyze(store)
        where = f"round {round_}: {path.relative_to(store)}"
        assert "Traceback" not in proc.stderr, where + proc.stderr
        if proc.returncode != 0:
            assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: "), where
            proc = analyze(store)
        assert proc.returncode == 0, where + proc.stderr
        assert same_csvs(store, reference), where


def test_fuzzing_the_store_never_changes_a_result(reference, tmp_path):
    fuzz(reference, tmp_path, rounds=2, seed=0)


@pytest.mark.slow
def test_fuzzing_the_store_never_changes_a_result_long(reference, tmp_path):
    fuzz(reference, tmp_path, rounds=30, seed=1)


def test_clean_store_removes_only_what_no_output_needs(reference, tmp_path):
    from conftest import cli_in_process
    from unlib.store import set_aside

    store = copy_of(reference, tmp_path / "store")
    cache = next(store.glob(f"activations/{MODELS}-*--seed-1/*/*.h5"))
    block = next(store.glob("correlation/*/blocks/*.h5"))
    leftovers = {partial_path(cache): "an interrupted write whose file was finished since",
                 block.with_name("ref-0_units-0123456789abcdef.h5"): "a correlation block the merged correlations were",
                 store / RESULTS / ".universal_neurons.csv.tmp-999999": "left by an interrupted write"}
    sources = [cache, block, store / RESULTS / "universal_neurons.csv"]  # a block of another plan: a block's copy
    for path, source in zip(leftovers, sources):
        shutil.copyfile(source, path)
    old = time.time() - 2 * 3600  # an abandoned temporary file (a recent one may be another host's writer's)
    os.utime(store / RESULTS / ".universal_neurons.csv.tmp-999999", (old, old))
    refused = set_aside(shutil.copyfile(block, block.with_name("copy.h5")))
    leftovers[refused] = "set aside as damaged or altered"
    pending = shutil.copyfile(block, block.with_name("ref-1_units-fedcba9876543210.h5"))  # reference 1: not merged
    listed = cli_in_process(store, "clean-store")
    assert listed.returncode == 0, listed.stderr
    assert pending.name not in listed.stdout
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == len(leftovers) + 1 and lines[-1].startswith(f"{len(leftovers)} files, ")
    for path, why in leftovers.items():
        line = next(line for line in lines if str(path.relative_to(store)) in line)
        assert why in line and f"{path.stat().st_size / 2**20:,.2f} MiB" in line
    before = {p for p in store.rglob("*") if p.is_file()}
    removed = cli_in_process(store, "clean-store", "--confirm")
    assert removed.stdout.strip().splitlines()[-1].startswith(f"removed {len(leftovers)} files: ")
    assert before - {p for p in store.rglob("*") if p.is_file()} == set(leftovers)
    pending.unlink()
    assert cli_in_process(store, "clean-store").stdout.strip().endswith("nothing to clean")
    proc = analyze(store)  # nothing a result needs was removed: nothing runs again
    assert proc.returncode == 0 and "0 tasks run here" in proc.stdout, proc.stdout + proc.stderr
    assert same_csvs(store, reference)


def test_held_out_tokens_the_dataset_lacks_stop_the_run_before_any_model_runs(mini_zoo, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(mini_zoo, store / "zoo")
    dataset = tmp_path / "code.txt"
    dataset.write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(700)))
    proc = subprocess.run([sys.executable, "-m", "tasks", "analyze", "--models", MODELS, "--checkpoint", "300",
                           "--n-tokens", "4096", "--ablation-tokens", "1000000", "--dataset", str(dataset),
                           "--scheduler", "local"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset yields only ") and "after the documents of the 4096 analysed ones" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(store.glob("tokens/*/*.h5")) and not (store / "activations").exists()  # no model ran


def test_ctrl_c_is_one_line_and_the_run_resumes_to_the_same_results(reference, mini_zoo, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(mini_zoo, store / "zoo")
    proc = subprocess.Popen([sys.executable, "-m", "tasks", "analyze", *ARGS], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1"})
    end = time.monotonic() + 120
    while not list(store.glob("activations/*/*/*.h5")) and time.monotonic() < end:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: finished files are kept"), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not (store / RESULTS / "run.json").exists()
    resumed = analyze(store)
    assert resumed.returncode == 0, resumed.stderr
    assert same_csvs(store, reference)


def test_a_dataset_removed_or_read_as_another_dtype_is_refused(tmp_path):
    path = tmp_path / "tokens.h5"
    tokens = np.arange(640, dtype=np.int32).reshape(10, 64)
    write_h5(path, {"tokens": tokens, "keep": tokens % 3 > 0}, {"provenance": "p"})
    with h5py.File(path, "a") as f:  # the same bytes, meant as another dtype; and a dataset gone
        raw = f["tokens"][:].view(np.float32)
        del f["tokens"], f["keep"], f["keep" + CHECKSUMS]
        f.create_dataset("tokens", data=raw)
        f["tokens"].attrs["crc32_rows"] = 10
    assert h5_problem(path, "p") == ("damaged", "its datasets, dtypes or shapes differ from those written")
    with pytest.raises(DamagedFile, match="its datasets, dtypes or shapes differ"):
        read_h5(path)


def test_a_close_that_fails_only_while_freeing_never_renames(tmp_path):
    class FailsWhenFreed:
        def __del__(self):
            raise OSError(28, "No space left on device")

    class ReportsOnlyWhenFreed:  # the file, whose close reports its failure as HDF5 may: unraisably
        def __init__(self, file):
            self.file = file

        def close(self):
            self.file.close()
            FailsWhenFreed()

        def __getattr__(self, name):
            return getattr(self.file, name)

    path = tmp_path / "cache.h5"
    writer = PartialH5(path, {"layer_000": ((10, 4), "float32", (5, 4))}, {"provenance": "p"})
    writer.write_rows(0, {"layer_000": np.ones((10, 4), np.float32)})
    writer.file = ReportsOnlyWhenFreed(writer.file)
    with pytest.raises(StoreWriteError, match="the disk is full"):
        writer.finish()
    assert not path.exists() and not partial_path(path).exists()


def test_checked_writes_nest_and_restore_the_hook(tmp_path):
    before = sys.unraisablehook
    outer, inner = checked_writes(tmp_path / "a.h5"), checked_writes(tmp_path / "b.h5")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    assert sys.unraisablehook is before


def test_a_damaged_input_makes_no_completeness_check_raise(tmp_path, monkeypatch):
    from tasks.targets import H5Target, rebuilt_input
    from unlib.h5read import content_digest
    from unlib.store import provenance

    monkeypatch.setenv("UNLIB_STORE", str(tmp_path))
    made, output = tmp_path / "input.h5", tmp_path / "output.h5"
    write_h5(made, {"x": np.arange(10)}, {"provenance": "p"})
    write_h5(output, {"y": np.arange(3)}, {"provenance": provenance({"a": 1}),
                                           "made_from": f'{{"input.h5": "{content_digest(made)}"}}'})
    assert H5Target(output, {"a": 1}).exists()
    made.write_bytes(made.read_bytes()[:100])  # truncated: its own task sets it aside when it is needed
    assert rebuilt_input(f'{{"input.h5": "{content_digest(output)}"}}') is None
    assert H5Target(output, {"a": 1}).exists()
