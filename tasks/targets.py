"""The store the tasks write to, and its file targets: HDF5 files and sealed results files
that count as complete only when whole, made from this run's inputs, and from inputs that
still hold what they held."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import luigi

from unlib.h5read import content_digest, h5_attribute, h5_problem
from unlib.store import Store, provenance, seal, seal_problem, seal_record, set_aside

logger = logging.getLogger("luigi-interface")


def store() -> Store:
    """The store all tasks write to, at an absolute path: $UNLIB_STORE, else store/ in the
    source checkout, else ~/.cache/universal-neurons/store (unlib.store.default_root)."""
    return Store()


_reported: set[str] = set()


def warn_once(key: str, message: str, *args) -> None:
    """Log a warning once per process and key: complete() is asked many times per run, and
    one changed input makes every file built from it stale."""
    if key not in _reported:
        _reported.add(key)
        logger.warning(message, *args)


def warn_stale(path: str, problem: str) -> None:
    warn_once(problem, "rebuilding %s (and what else was made from the same inputs): %s", path, problem)


def made_from(task: luigi.Task) -> str:
    """The content digests of the store files a task's outputs are made from (its inputs'
    files, by path within the store), as the JSON text its outputs record."""
    root = store().root
    digests = {os.path.relpath(t.path, root): content_digest(t.path) for t in luigi.task.flatten(task.input())
               if os.path.isfile(t.path)}
    return json.dumps(digests, sort_keys=True)


def rebuilt_input(recorded: str | None) -> str | None:
    """Which input a file was made from has been rebuilt (other content) since, in words; None
    when every recorded input still holds what it held. An input no longer there (caches
    removed to free disk) invalidates nothing: it is checked again if it is rebuilt."""
    root = store().root
    for name, digest in sorted(json.loads(recorded or "{}").items()):
        try:
            found = content_digest(root / name)
        except Exception:  # noqa: BLE001  gone, or damaged: its own task sets it aside and rebuilds it when needed
            continue
        if found != digest:
            return f"{name}, which it was made from, was rebuilt since"
    return None


class StoreTarget(luigi.LocalTarget):
    """A store file that exists only when `usable()` says it is whole and made from the
    `expected` inputs (its provenance)."""

    def __init__(self, path, expected: dict):
        super().__init__(str(path))
        self.expected = provenance(expected)

    def exists(self) -> bool:
        return super().exists() and self.usable()

    def usable(self) -> bool:
        raise NotImplementedError


class H5Target(StoreTarget):
    """An HDF5 file target that exists only if it opens, its values match their checksums
    (verified whole for small files, by every read for caches), it records the expected
    provenance, and the store files it was made from still hold what they held. A file built
    from other inputs is removed and rebuilt; a damaged one is moved aside for inspection and
    rebuilt. Finished files are only ever renamed into place, so opening one here never races
    a writer."""

    def usable(self) -> bool:
        try:
            problem = h5_problem(self.path, self.expected)
            if problem is None and (rebuilt := rebuilt_input(h5_attribute(self.path, "made_from"))):
                problem = ("stale", rebuilt)
        except BlockingIOError:  # open for writing elsewhere: in use, not corrupt; never moved aside
            logger.warning("%s is open for writing in another process; not using it", self.path)
            return False
        except FileNotFoundError:  # another worker set it aside meanwhile
            return False
        if problem is None:
            return True
        kind, why = problem
        if kind == "stale":
            warn_stale(self.path, why)
            Path(self.path).unlink(missing_ok=True)
        else:
            aside = set_aside(self.path)
            logger.warning("refusing %s: %s; moved it to %s and rebuilding it", self.path, why, aside.name)
        return False


class ResultTarget(StoreTarget):
    """A results file (CSV, PNG, HTML, JSON) that exists only when its seal vouches for it:
    whole (size and checksum as written) and made from this run's inputs. Anything else
    (truncated, edited, unsealed, stale) is rebuilt."""

    def usable(self) -> bool:
        problem = seal_problem(self.path, self.expected) or rebuilt_input(seal_record(self.path).get("made_from"))
        if problem is not None:
            warn_stale(self.path, problem)
        return problem is None

    def seal(self, inputs: str) -> None:
        """Vouch for the written file, recording the content of the files it was made from (made_from)."""
        seal(self.path, self.expected, made_from=inputs)


