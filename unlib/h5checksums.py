"""Checksummed HDF5 files, the one way the pipeline writes (unlib.h5write) and reads
(unlib.h5read) its arrays: their checksums, and the checks of what is read back.

Every dataset carries CRC-32 checksums of the values that were meant to be written (one per
HDF5 chunk of rows for the large row-blocked files, one per dataset for small ones), kept in
a sibling dataset `<name>.crc32`. Every write, flush and close is checked (HDF5 reports some
failed writes, a full disk among them, only as "Exception ignored" while it frees an object,
so those are caught too), and every read verifies the checksums of what it returns. So
neither a failed write nor a flipped bit ever reaches a result: a damaged file is set
aside (renamed `*.refused-<time>`) with one line saying so, and rebuilt."""
from __future__ import annotations

import json
import zlib

import h5py
import numpy as np

CHECKSUMS = ".crc32"  # suffix of the dataset holding another dataset's checksums
UNIT_ROWS = "crc32_rows"  # attribute of a dataset: rows each of its checksums covers
ATTRS_CHECKSUM = "attrs_crc32"  # attribute of a file: the checksum of its other attributes
LAYOUT = "layout"  # attribute of a file: its datasets' names, dtypes and shapes (JSON), under attrs_crc32
UNCHECKED_ATTRS = (ATTRS_CHECKSUM, "rows_done")  # rows_done: a partial file's progress, checked by the rows' own


class Mismatch(Exception):
    """Values that cannot be read back as written (raised inside this module and
    unlib.h5read only)."""


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
