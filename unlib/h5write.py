"""Writing checksummed HDF5 files (unlib.h5checksums): small files at once (write_h5), large
row-blocked ones crash-safely (PartialH5); every write, flush and close is checked."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from unlib.h5checksums import (ATTRS_CHECKSUM, CHECKSUMS, LAYOUT, UNIT_ROWS, attrs_checksum, layout, n_units,
                               unit_checksums)
from unlib.store import (FAILED_WRITES, HDF5_ERRNO, StoreWriteError, atomic_path, durable_replace, ensure_space,
                         write_failure)

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


def _set_attrs(f: h5py.File, attrs: dict) -> None:
    """Set a new file's attributes (after its datasets), its layout and their checksum."""
    for key, value in attrs.items():
        f.attrs[key] = value
    f.attrs[LAYOUT] = layout(f)
    f.attrs[ATTRS_CHECKSUM] = attrs_checksum(dict(f.attrs))


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
