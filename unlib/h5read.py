"""Reading checksummed HDF5 files (unlib.h5checksums): verified reads (H5Reader, read_h5), and
what the pipeline asks of a finished file without using it (h5_problem, h5_attribute,
content_digest). A damaged file is set aside (DamagedFile)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np

from unlib import UserError
from unlib.h5checksums import (ATTRS_CHECKSUM, CHECKSUMS, LAYOUT, UNIT_ROWS, Mismatch, checked_attrs, checked_rows,
                               data_names, n_units)
from unlib.store import describe_change, file_fingerprint, per_file_version, set_aside


class DamagedFile(UserError):
    """A store file that cannot be read back as it was written: it is set aside on the spot
    (never read again) and the same command rebuilds it."""

    def __init__(self, path: str | Path, detail: str):
        self.path = Path(path)
        aside = set_aside(self.path)
        super().__init__(f"{self.path} is damaged ({detail.splitlines()[0]}); set it aside as {aside.name}, "
                         f"to be rebuilt")


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
