"""Checksummed HDF5 files: the one way the pipeline writes and reads its arrays.

Every dataset carries CRC-32 checksums of the values that were meant to be written (one per
HDF5 chunk of rows for the large row-blocked files, one per dataset for small ones), kept in
a sibling dataset `<name>.crc32`. Every write, flush and close is checked (HDF5 reports some
failed writes, a full disk among them, only as "Exception ignored" while it frees an object,
so those are caught too), and every read verifies the checksums of what it returns. So
neither a failed write nor a flipped bit ever reaches a result: a damaged file is set
aside (renamed `*.refused-<time>`) with one line saying so, and rebuilt."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import zlib
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from unlib import UserError
from unlib.store import (FAILED_WRITES, HDF5_ERRNO, StoreWriteError, atomic_path, describe_change, durable_replace,
                         ensure_space, file_fingerprint, per_file_version, set_aside, write_failure)

CHECKSUMS = ".crc32"  # suffix of the dataset holding another dataset's checksums
UNIT_ROWS = "crc32_rows"  # attribute of a dataset: rows each of its checksums covers
ATTRS_CHECKSUM = "attrs_crc32"  # attribute of a file: the checksum of its other attributes
LAYOUT = "layout"  # attribute of a file: its datasets' names, dtypes and shapes (JSON), under attrs_crc32
UNCHECKED_ATTRS = (ATTRS_CHECKSUM, "rows_done")  # rows_done: a partial file's progress, checked by the rows' own


class Mismatch(Exception):
    """Values that cannot be read back as written (raised inside this module only)."""


class DamagedFile(UserError):
    """A store file that cannot be read back as it was written: it is set aside on the spot
    (never read again) and the same command rebuilds it."""

    def __init__(self, path: str | Path, detail: str):
        self.path = Path(path)
        aside = set_aside(self.path)
        super().__init__(f"{self.path} is damaged ({detail.splitlines()[0]}); set it aside as {aside.name}, "
                         f"to be rebuilt")


_writes = threading.local()  # .failures: the failed writes seen in this thread's checked_writes
_hook_lock = threading.Lock()
_hook_users = 0
_previous_hook = sys.unraisablehook


def _write_error(exc: BaseException) -> bool:
    """Whether an exception reports a failed write to a file (HDF5 names the errno in its message)."""
    return isinstance(exc, (OSError, RuntimeError)) and bool(
        HDF5_ERRNO.search(str(exc)) or getattr(exc, "errno", None) in FAILED_WRITES)


def _unraisable(unraisable) -> None:
    failures = getattr(_writes, "failures", None)
    if failures is not None and _write_error(unraisable.exc_value):
        failures.append(unraisable.exc_value)
    else:
        _previous_hook(unraisable)


@contextlib.contextmanager
def checked_writes(path: str | Path, needed_bytes: int | None = None) -> Iterator[None]:
    """Raise StoreWriteError when any HDF5 write inside the block failed: raised, or only
    reported as an unraisable exception while h5py freed an object (collected per thread, by
    a hook installed while any thread is inside such a block)."""
    global _hook_users, _previous_hook
    with _hook_lock:
        if _hook_users == 0:
            _previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable
        _hook_users += 1
    outer, _writes.failures = getattr(_writes, "failures", None), []
    try:
        try:
            yield
        except (OSError, RuntimeError) as exc:
            raise write_failure(path, exc, needed_bytes) from None
        if _writes.failures:
            raise write_failure(path, _writes.failures[0], needed_bytes)
    finally:
        _writes.failures = outer
        with _hook_lock:
            _hook_users -= 1
            if _hook_users == 0:
                sys.unraisablehook = _previous_hook


def crc32(values: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(values).view(np.uint8).reshape(-1))


def unit_checksums(values: np.ndarray, rows: int) -> np.ndarray:
    """The CRC-32 of each block of `rows` rows of `values` (one for a 0-d array)."""
    if values.ndim == 0:
        return np.array([crc32(values)], dtype=np.uint32)
    return np.array([crc32(values[i:i + rows]) for i in range(0, len(values), rows)], dtype=np.uint32)


def _plain(value):
    """An attribute's value as plain Python (as HDF5 gives it back: numpy scalars and arrays, bytes)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.decode() if isinstance(value, bytes) else value


def attrs_checksum(attrs: dict) -> int:
    """The CRC-32 of a file's attributes (all but UNCHECKED_ATTRS), as read back."""
    text = json.dumps({k: _plain(v) for k, v in attrs.items() if k not in UNCHECKED_ATTRS}, sort_keys=True,
                      default=str)
    return zlib.crc32(text.encode())


def layout(f: h5py.File) -> str:
    """An open file's datasets (checksums included) with their dtypes and shapes, as JSON: the
    checksums cover values' bytes, this what the bytes mean and which datasets there are."""
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return json.dumps({name: [f[name].dtype.str, list(f[name].shape)] for name in sorted(names)})


def _set_attrs(f: h5py.File, attrs: dict) -> None:
    """Set a new file's attributes (after its datasets), its layout and their checksum."""
    for key, value in attrs.items():
        f.attrs[key] = value
    f.attrs[LAYOUT] = layout(f)
    f.attrs[ATTRS_CHECKSUM] = attrs_checksum(dict(f.attrs))


def checked_attrs(f: h5py.File) -> dict:
    """An open file's attributes, verified against their checksum, and its datasets against
    the layout they record; raises Mismatch."""
    try:
        attrs = dict(f.attrs)
        found = layout(f)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise Mismatch(f"its metadata: {(str(exc) or type(exc).__name__).splitlines()[0]}") from None
    if ATTRS_CHECKSUM not in attrs or LAYOUT not in attrs:
        raise Mismatch("its attributes have no checksum")
    if attrs_checksum(attrs) != attrs[ATTRS_CHECKSUM]:
        raise Mismatch("its attributes do not match their checksum")
    if found != attrs[LAYOUT]:
        raise Mismatch("its datasets, dtypes or shapes differ from those written")
    return attrs


def n_units(shape: tuple[int, ...], rows: int) -> int:
    return 1 if not shape else -(-shape[0] // rows)


def _create_checked(f: h5py.File, name: str, value: np.ndarray) -> None:
    dataset = f.create_dataset(name, data=value)
    rows = max(1, value.shape[0]) if value.ndim else 1
    dataset.attrs[UNIT_ROWS] = rows
    f.create_dataset(name + CHECKSUMS, data=unit_checksums(value, rows))


def write_h5(path: str | Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write a small file (a few arrays, each with its checksum) atomically; a failed write
    raises StoreWriteError and leaves the old file, if any, in place."""
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    ensure_space(path, sum(a.nbytes for a in arrays.values()))
    with atomic_path(path) as tmp:
        with checked_writes(path, sum(a.nbytes for a in arrays.values())):
            with h5py.File(tmp, "w") as f:
                for name, value in arrays.items():
                    _create_checked(f, name, value)
                _set_attrs(f, attrs)


def partial_path(path: str | Path) -> Path:
    """Where PartialH5 writes `path` until it is finished."""
    path = Path(path)
    return path.with_name(path.stem + ".partial.h5")


class PartialH5:
    """Crash-safe writer for a large row-blocked HDF5 file whose datasets share their rows
    and chunk rows.

    Rows go to `<name>.partial.h5` whole chunks at a time, each chunk with its checksum;
    after each write the data is flushed, then the `rows_done` attribute, then flushed
    again, so a SIGKILL leaves a file whose first `rows_done` rows are valid, and a failed
    write (a full disk) removes the partial file and raises StoreWriteError. `finish()`
    writes the last rows and renames the file atomically onto the final name. Re-opening a
    partial file resumes from `rows_done`; write_rows skips rows before it.
    """

    def __init__(self, path: str | Path, datasets: dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]],
                 attrs: dict):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failure(self.path, exc) from None
        shapes = list(datasets.values())
        self.n_rows, self.unit = shapes[0][0][0], shapes[0][2][0]
        if any(shape[0] != self.n_rows or chunks[0] != self.unit for shape, _, chunks in shapes):
            raise ValueError("PartialH5 datasets must share their rows and chunk rows")
        self.row_bytes = sum(int(np.prod(shape[1:])) * np.dtype(dtype).itemsize for shape, dtype, _ in shapes)
        self.needed = self.n_rows * self.row_bytes
        self.file = None
        if self.partial.exists():
            try:
                self.file = h5py.File(self.partial, "a")
                recorded = dict(self.file.attrs)
                if any(recorded.get(k) != attrs.get(k) for k in ("provenance", "made_from")):
                    raise ValueError("made from other inputs")
                if any(self.file[name].attrs.get(UNIT_ROWS) != self.unit for name in datasets):
                    raise ValueError("written without chunk checksums")
            except BlockingIOError:  # another process writes it: not ours to delete
                raise
            except (OSError, ValueError, KeyError):
                if self.file is not None:
                    self.file.close()
                self.file = None
                self.partial.unlink()
        if self.file is None:
            with self.checked():
                self.file = h5py.File(self.partial, "w")
                for name, (shape, dtype, chunks) in datasets.items():
                    # fletcher32: HDF5's own check of each stored chunk, besides ours of the values
                    self.file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, fletcher32=True)
                    self.file[name].attrs[UNIT_ROWS] = self.unit
                    self.file.create_dataset(name + CHECKSUMS, shape=(n_units(shape, self.unit),), dtype="uint32")
                _set_attrs(self.file, attrs)
                self.file.attrs["rows_done"] = 0
                self.file.flush()
        self.datasets = {name: self.file[name] for name in datasets}
        self.pending: dict[str, list[np.ndarray]] = {name: [] for name in datasets}
        self.next_row = self.rows_done

    @property
    def rows_done(self) -> int:
        return int(self.file.attrs["rows_done"])

    @contextlib.contextmanager
    def checked(self) -> Iterator[None]:
        """Fail the write, and remove the partial file, when HDF5 reports any error in it."""
        try:
            with checked_writes(self.partial, self.needed):
                yield
        except StoreWriteError:
            self.discard()
            raise

    def write_rows(self, start: int, blocks: dict[str, np.ndarray]) -> None:
        """Add the rows of `blocks` (one array per dataset) that start at row `start`: rows
        before those already taken are skipped; whole chunks are written as they fill."""
        if start > self.next_row:
            raise ValueError(f"rows {self.next_row}-{start} were never given")
        for name, block in blocks.items():
            self.pending[name].append(np.asarray(block, dtype=self.datasets[name].dtype)[self.next_row - start:])
        self.next_row = max(self.next_row, start + len(next(iter(blocks.values()))))
        self._write(whole_units_only=True)

    def _write(self, whole_units_only: bool) -> None:
        first = self.rows_done
        rows = self.next_row - first
        if whole_units_only:
            rows -= rows % self.unit
        if rows <= 0:
            return
        # refused before HDF5 meets a full disk: the file then still holds rows_done valid rows
        ensure_space(self.partial, rows * self.row_bytes, (self.n_rows - first) * self.row_bytes)
        with self.checked():
            for name, dataset in self.datasets.items():
                values = np.concatenate(self.pending[name]) if len(self.pending[name]) > 1 else self.pending[name][0]
                dataset[first:first + rows] = values[:rows]
                unit = first // self.unit
                sums = unit_checksums(values[:rows], self.unit)
                self.file[name + CHECKSUMS][unit:unit + len(sums)] = sums
                self.pending[name] = [values[rows:]]
            self.file.flush()
            self.file.attrs["rows_done"] = first + rows
            self.file.flush()

    def finish(self) -> None:
        """Write the last rows, close the file and rename it onto its final name; all rows
        must have been given."""
        self._write(whole_units_only=False)
        if self.rows_done != self.n_rows:
            raise ValueError(f"{self.partial} holds {self.rows_done} of its {self.n_rows} rows")
        with self.checked():
            self.file.close()
        durable_replace(self.partial, self.path)  # only once the close reported no error

    def close(self) -> None:
        if self.file is not None and self.file.id.valid:
            self.file.close()

    def discard(self) -> None:
        """Close and remove the partial file after a failed write (its last rows cannot be trusted)."""
        with contextlib.suppress(Exception), open(os.devnull, "w") as devnull, \
                contextlib.redirect_stderr(devnull):
            self.close()
        self.partial.unlink(missing_ok=True)


def data_names(f: h5py.File) -> list[str]:
    """The data datasets of an open file (their checksum datasets left out), sorted."""
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name)
                 if isinstance(obj, h5py.Dataset) and not name.endswith(CHECKSUMS) else None)
    return sorted(names)


def checked_rows(f: h5py.File, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows start:stop of dataset `name` of an open file, verified against their checksums
    (the whole checksum units around them are read); raises Mismatch when they differ."""
    try:
        dataset = f[name]
        if dataset.ndim == 0:
            values, first, rows, units = np.asarray(dataset[()]), 0, 1, slice(0, 1)
        else:
            rows = int(dataset.attrs[UNIT_ROWS])
            stop = dataset.shape[0] if stop is None else min(stop, dataset.shape[0])
            first = start // rows * rows
            units = slice(first // rows, -(-stop // rows))
            values = dataset[first:min(units.stop * rows, dataset.shape[0])]
        expected = f[name + CHECKSUMS][units]
    except (OSError, KeyError, ValueError, RuntimeError) as exc:  # fletcher32, a damaged index, no checksums
        raise Mismatch(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    found = unit_checksums(values, rows)
    if not np.array_equal(found, expected):
        bad = int(np.flatnonzero(found != expected)[0]) if len(found) == len(expected) else 0
        raise Mismatch(f"{name} rows from {first + bad * rows:,} do not match their checksum")
    return values if dataset.ndim == 0 else values[start - first:stop - first]


class H5Reader:
    """Verified read access to a finished file: every read checks the checksums of the rows
    it returns. A file that cannot be opened, or whose values do not match what was written,
    raises DamagedFile (which sets it aside)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():  # not damage: a file nobody wrote
            raise FileNotFoundError(f"no such file: {self.path}")
        try:
            self.file = h5py.File(self.path, "r")
        except BlockingIOError:
            raise
        except Exception as exc:  # noqa: BLE001  a damaged superblock fails in many ways
            raise DamagedFile(self.path, f"unreadable or truncated HDF5 file: {exc}") from None
        try:
            self.attrs = checked_attrs(self.file)
        except Mismatch as exc:
            self.file.close()
            raise DamagedFile(self.path, str(exc)) from None

    def __enter__(self) -> "H5Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def names(self) -> list[str]:
        try:
            return data_names(self.file)
        except Exception as exc:  # noqa: BLE001  damaged metadata
            raise DamagedFile(self.path, f"its index: {exc}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file[name].shape

    def unit_rows(self, name: str) -> int:
        """Rows each checksum covers: reads aligned to them read nothing twice."""
        try:
            return int(self.file[name].attrs[UNIT_ROWS])
        except KeyError:
            raise DamagedFile(self.path, f"{name} has no checksums") from None

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start:stop of dataset `name`, verified against their checksums."""
        try:
            return checked_rows(self.file, name, start, stop)
        except Mismatch as exc:
            raise DamagedFile(self.path, str(exc)) from None

    def read_all(self) -> dict[str, np.ndarray]:
        """Every data dataset, verified."""
        return {name: self.read(name) for name in self.names()}


def verified_attrs(path: str | Path) -> dict:
    """A finished file's attributes, verified, without setting a damaged file aside (raises
    Mismatch or OSError): for looking, not for using."""
    with h5py.File(path, "r") as f:
        return checked_attrs(f)


def read_h5(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(every dataset, verified; the file's attributes) of a small file."""
    with H5Reader(path) as reader:
        return reader.read_all(), reader.attrs


# Files up to this size are verified whole when a task asks whether they exist; larger
# ones (activation caches) are verified by every read instead.
VERIFY_WHOLE_BYTES = 256 * 2**20


@per_file_version
def h5_problem(path: str, size: int, mtime_ns: int, expected_provenance: str | None = None) -> tuple[str, str] | None:
    """Called as h5_problem(path, expected_provenance=None): why a finished file cannot be
    used, as (kind, why): ("damaged", ...) for a file that
    does not open or whose values do not match their checksums (files up to
    VERIFY_WHOLE_BYTES are verified whole, larger ones by their structure); ("stale", ...)
    for one written by an older version or from other inputs. None when it is fine. Raises
    BlockingIOError when another process holds it open for writing."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            names = data_names(f)
            unchecked = [n for n in names if UNIT_ROWS not in f[n].attrs or n + CHECKSUMS not in f]
            if ATTRS_CHECKSUM not in attrs or LAYOUT not in attrs or unchecked:
                if expected_provenance is not None and attrs.get("provenance") != expected_provenance:
                    return "stale", describe_change(attrs.get("provenance"), expected_provenance)
                return "stale", "it records no checksums (written by an older version)"
            checked_attrs(f)
            for name in names:
                if f[name + CHECKSUMS].shape != (n_units(f[name].shape, int(f[name].attrs[UNIT_ROWS])),):
                    raise Mismatch(f"{name} has checksums for another shape")
            if expected_provenance is not None and attrs["provenance"] != expected_provenance:
                return "stale", describe_change(attrs["provenance"], expected_provenance)
            if size <= VERIFY_WHOLE_BYTES:
                for name in names:
                    checked_rows(f, name)
    except BlockingIOError:  # HDF5's file lock (errno 11): a writer has it open
        raise
    except Mismatch as exc:
        return "damaged", str(exc)
    except Exception as exc:  # noqa: BLE001  damaged metadata fails in many ways (OSError, KeyError, ...)
        return "damaged", f"unreadable or truncated HDF5 file ({(str(exc) or type(exc).__name__).splitlines()[0]})"
    return None


@per_file_version
def h5_attribute(path: str, size: int, mtime_ns: int, name: str):
    """Called as h5_attribute(path, name): one attribute of a finished file (None when it has none)."""
    with h5py.File(path, "r") as f:
        return f.attrs.get(name)


@per_file_version
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with h5py.File(path, "r") as f:
        digest.update(f"{f.attrs[LAYOUT]}{f.attrs[ATTRS_CHECKSUM]}".encode())
        for name in data_names(f):
            digest.update(name.encode())
            digest.update(f[name + CHECKSUMS][()].tobytes())
    return digest.hexdigest()[:16]


def content_digest(path: str | Path) -> str:
    """A digest of a store file's content: of its layout, attributes and checksums for an HDF5
    file (so the same values rewritten give the same digest), else of its bytes."""
    return _digest(path) if str(path).endswith(".h5") else file_fingerprint(path)
