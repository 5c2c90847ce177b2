"""Where every artefact lives. All output paths derive from parameters here, in one place,
so two runs with different parameters never collide and the same run finds its files."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

from unlib import UserError

logger = logging.getLogger(__name__)


def short_hash(value: object, length: int = 8) -> str:
    """Stable hex digest of a JSON-serialisable value."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def slug(name: str) -> str:
    """File-system-safe version of a model or dataset name ('org/name' -> 'org--name')."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name.replace("/", "--")).strip("-")


# Files up to this size are fingerprinted by their whole content; larger ones (model weights)
# by size, modification time and the content of their first and last MiB.
FULL_HASH_BYTES = 256 * 2**20
EDGE_BYTES = 2**20


def per_file_version(function):
    """`function(path, size, mtime_ns, *args)` as `f(path, *args)`, computed once per process for
    each version of the file (its resolved path, size and modification time)."""
    cached = functools.lru_cache(maxsize=4096)(function)

    def for_path(path: str | Path, *args):
        st = os.stat(path)
        return cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, *args)

    for_path.__name__, for_path.__doc__ = function.__name__, function.__doc__
    return for_path


@per_file_version
def file_fingerprint(path: str, size: int, mtime_ns: int) -> str:
    """A digest that changes when the file's content does (see FULL_HASH_BYTES); called as
    file_fingerprint(path)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        else:
            digest.update(f"{size}:{mtime_ns}".encode())
            digest.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()[:16]


def checkpoint_label(checkpoint: int | None) -> str:
    return "final" if checkpoint is None else f"checkpoint-{checkpoint}"


CHECKOUT = Path(__file__).resolve().parent.parent  # the source tree, when the code runs from one


def default_root() -> Path:
    """Where the store lives, as an absolute path: $UNLIB_STORE (a relative value is taken
    from the current directory), else `store/` in the source checkout the code runs from
    (a clone, or an editable install of one), else, for an installed copy,
    $XDG_CACHE_HOME/universal-neurons/store (~/.cache/universal-neurons/store)."""
    configured = os.environ.get("UNLIB_STORE")
    if configured:
        return Path(configured).expanduser().absolute()
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "Makefile").is_file():
        return CHECKOUT / "store"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser().absolute() / "universal-neurons" / "store"


class Store:
    """The store/ tree: one method per kind of artefact (root: default_root())."""

    def __init__(self, root: str | Path | None = None):
        self.root = default_root() if root is None else Path(root)

    def zoo_dir(self, zoo_id: str) -> Path:
        return self.root / "zoo" / zoo_id

    def zoo_tokenizer_dir(self, zoo_id: str) -> Path:
        return self.zoo_dir(zoo_id) / "tokenizer"

    def zoo_training_tokens(self, zoo_id: str) -> Path:
        return self.zoo_dir(zoo_id) / "train_tokens.h5"

    def zoo_model_dir(self, zoo_id: str, seed: int) -> Path:
        return self.zoo_dir(zoo_id) / f"seed-{seed}"

    def tokens(self, dataset_id: str, tokenizer_id: str, n_tokens: int, ctx_len: int, exclude_tokens: str,
               document_seed: int, skip_tokens: int = 0) -> Path:
        """A token file; with `skip_tokens`, the held-out tokens after the file of that many, in a
        `held-out/` subfolder (`..._skip<S>.h5`), apart from the analysed token files."""
        plain = re.fullmatch(r"[A-Za-z0-9_,]{1,32}", exclude_tokens)
        excluded = exclude_tokens.replace(",", "-") if plain else short_hash(exclude_tokens)
        name = f"{slug(tokenizer_id)}_ctx{ctx_len}_n{n_tokens}_excl-{excluded}_seed{document_seed}"
        folder = self.root / "tokens" / slug(dataset_id)
        return folder / "held-out" / f"{name}_skip{skip_tokens}.h5" if skip_tokens else folder / f"{name}.h5"

    def activations(self, model_id: str, checkpoint: int | None, tokens_file: Path) -> Path:
        tokens_name = f"{tokens_file.parent.name}__{tokens_file.name}"
        return self.root / "activations" / slug(model_id) / checkpoint_label(checkpoint) / tokens_name

    def correlation(self, run_key: str, reference_id: str, layer: int) -> Path:
        return self.correlation_dir(run_key, reference_id) / f"layer_{layer:03d}.h5"

    def correlation_dir(self, run_key: str, reference_id: str) -> Path:
        """A reference model's correlations (and the excess scores made from them) for one
        set of models, tokens and rotations."""
        return self.root / "correlation" / run_key / slug(reference_id)

    def neuron_stats(self, model_id: str, checkpoint: int | None, tokens_file: Path) -> Path:
        """A model's neuron statistics over one token file: shared by every run that analyses
        that model on those tokens, whatever its threshold, reference set or rotations."""
        tokens_name = f"{tokens_file.parent.name}__{tokens_file.stem}"
        return self.root / "stats" / slug(model_id) / checkpoint_label(checkpoint) / tokens_name / "neuron_stats.csv"

    def families(self, model_id: str, checkpoint: int | None, tokens_file: Path) -> Path:
        """The folder of a model's neuron families over one token file (explanations, roles,
        families, variance reduction): shared, like its neuron statistics, by every run on them."""
        tokens_name = f"{tokens_file.parent.name}__{tokens_file.stem}"
        return self.root / "families" / slug(model_id) / checkpoint_label(checkpoint) / tokens_name

    def interventions(self, model_id: str, checkpoint: int | None, held_out_file: Path, seed: int) -> Path:
        """The folder of a model's causal checks on one held-out token file with one seed of
        random controls: shared by every run that reads them, whatever its threshold."""
        return self.families(model_id, checkpoint, held_out_file) / f"interventions_seed-{seed}"

    def correlation_block(self, run_key: str, references: str, units: str) -> Path:
        """A correlation block's partial results: named by its references and a hash of its units."""
        return self.root / "correlation" / run_key / "blocks" / f"ref-{references}_units-{short_hash(units, 16)}.h5"

    def correlation_plan(self, run_key: str, references: str) -> Path:
        """The blocks a correlation was split into, recorded by the first process that planned it."""
        return self.root / "correlation" / run_key / "blocks" / f"plan-ref-{references}.json"

    def free_disk(self) -> tuple[Path, int]:
        """(the nearest existing folder at or above the store root, its free bytes)."""
        existing = nearest_existing(self.root)
        return existing, shutil.disk_usage(existing).free

    def results(self, model_set: str, checkpoint: int | None, variant: dict | None = None) -> Path:
        """results/<model set>/<checkpoint>[_<param>-<value>...]: the suffix names each
        parameter that differs from its default, so runs never overwrite each other."""
        return self.root / "results" / slug(model_set) / _with_variant(checkpoint_label(checkpoint), variant)

    def ablation_results(self, results: Path, variant: dict | None = None) -> Path:
        """Where the files that read the ablation settings go: `results` itself at the defaults,
        else results/ablation_<param>-<value>...: another ablation moves only them."""
        return results / _with_variant("ablation", variant) if variant else results

    def compare(self, model_set: str, checkpoints: list[int], variant: dict | None = None) -> Path:
        """results/<model set>/compare-<step>-<step>...[_<param>-<value>...]."""
        name = "compare-" + "-".join(str(s) for s in sorted(checkpoints))
        return self.root / "results" / slug(model_set) / _with_variant(name, variant)


def _with_variant(name: str, variant: dict | None) -> str:
    parts = [name]
    for key, value in sorted((variant or {}).items()):
        text = slug(str(value))
        parts.append(f"{key}-{text if len(text) <= 24 else short_hash(value)}")
    return "_".join(parts)


def durable_replace(source: Path, target: Path) -> None:
    """Rename source onto target so that after a crash or power loss the target is either
    the old file or the whole new one: flush the data, rename, flush the directory entry."""
    with open(source, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(source, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def link_file(source: str | Path, target: str | Path) -> None:
    """Show `source` at `target` too, atomically: a hard link (no copy, and a results folder
    copied elsewhere keeps real files), or a copy where the filesystem has no hard links."""
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def nearest_existing(path: Path) -> Path:
    """The nearest existing folder at or above `path` (whose disk a file there goes to)."""
    return next((p for p in [path, *path.resolve().parents] if p.exists()), Path("/"))


class StoreWriteError(UserError):
    """A write to the store that failed (a full or read-only disk): nothing was renamed into place."""


# The errors of a write that the user can fix: a full disk or quota, a read-only store.
FAILED_WRITES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
HDF5_ERRNO = re.compile(r"errno = (\d+)")  # how HDF5 names a failed system call's errno in its messages


def write_failure(path: str | Path, error: BaseException, needed_bytes: int | None = None) -> StoreWriteError:
    """One line for a failed write of `path`: a full disk with the free and needed space, a
    read-only store, or the system's own words (HDF5 gives the errno in its message)."""
    path = Path(path)
    found = HDF5_ERRNO.search(str(error))
    code = int(found.group(1)) if found else getattr(error, "errno", None)
    existing = nearest_existing(path.parent)
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(existing).free
        need = f"; it needs about {needed_bytes / 2**30:,.2f} GiB" if needed_bytes else ""
        return StoreWriteError(f"cannot write {path}: the disk is full ({free / 2**30:,.2f} GiB free under "
                               f"{existing}{need}); free space or point UNLIB_STORE at a larger disk, then run the "
                               f"same command again")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreWriteError(f"cannot write {path}: the store is not writable ({os.strerror(code)}); point "
                               f"UNLIB_STORE at a writable folder")
    return StoreWriteError(f"cannot write {path}: {str(error).splitlines()[0]}")


# Room kept free beyond a write's own bytes (HDF5's metadata, the filesystem's blocks)
WRITE_MARGIN = 4 * 2**20


def ensure_space(path: str | Path, nbytes: int, needed_bytes: int | None = None) -> None:
    """Refuse, before writing, a write of `nbytes` to `path` that the disk has no room for
    (a full disk met inside HDF5 leaves its library unable to close the file).
    `needed_bytes`: what the whole file still needs, for the message."""
    path = Path(path)
    if shutil.disk_usage(nearest_existing(path.parent)).free < nbytes + WRITE_MARGIN:
        raise write_failure(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), needed_bytes or nbytes)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds,
    so no reader ever sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        durable_replace(tmp, path)
    except OSError as exc:
        if exc.errno in FAILED_WRITES:
            raise write_failure(path, exc) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def provenance(values: dict) -> str:
    """The canonical text recorded in an HDF5 file's `provenance` attribute."""
    return json.dumps(values, sort_keys=True, default=str)


def h5_attrs(values: dict) -> dict:
    """`values` as HDF5 attributes (nested dicts as JSON text), with their `provenance`."""
    stored = {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in values.items()}
    return {**stored, "provenance": provenance(values)}


def describe_change(recorded: str | None, expected: str) -> str:
    """In words, how a file's recorded provenance differs from what this run expects: the
    inputs that changed (by name) first, then the parameters."""
    try:
        old = json.loads(recorded)
    except (TypeError, ValueError):
        return "it records no provenance (written by an older version)"
    new = json.loads(expected)
    old_inputs, new_inputs = old.pop("inputs", {}), new.pop("inputs", {})
    inputs = sorted(k for k in set(old_inputs) | set(new_inputs) if old_inputs.get(k) != new_inputs.get(k))
    params = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if inputs:
        return f"{' and '.join(inputs)} changed since it was written"
    return f"it was built with other parameters ({', '.join(params)})"


SEALS = ".sealed"


def seal_path(path: str | Path) -> Path:
    """The sidecar that vouches for a finished results file: <folder>/.sealed/<name>.json."""
    path = Path(path)
    return path.parent / SEALS / f"{path.name}.json"


def seal(path: str | Path, expected_provenance: str, **record) -> None:
    """Record a finished file's size, checksum and provenance (and `record`), after it is written whole."""
    write_json(seal_path(path), {"bytes": os.path.getsize(path), "sha256": file_fingerprint(path),
                                 "provenance": expected_provenance, **record})


def seal_record(path: str | Path) -> dict:
    """What a results file's seal records ({} when it has none)."""
    try:
        return read_json(seal_path(path))
    except (OSError, ValueError):
        return {}


def seal_problem(path: str | Path, expected_provenance: str) -> str | None:
    """Why a sealed results file cannot be used (no seal, truncated, altered, or built from
    other inputs), or None when it is whole and this run's."""
    try:
        record = read_json(seal_path(path))
    except (OSError, ValueError):
        return "it has no seal (an interrupted or older run wrote it)"
    written = record.get("bytes", -1)
    if os.path.getsize(path) != written:
        return f"it is truncated or altered ({os.path.getsize(path):,} bytes, written with {written:,})"
    if file_fingerprint(path) != record.get("sha256"):
        return "its content changed since it was written"
    if record.get("provenance") != expected_provenance:
        return describe_change(record.get("provenance"), expected_provenance)
    return None


@contextlib.contextmanager
def exclusive(paths: Iterable[str | Path], lock_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for each path while the block runs (flock on a file in
    lock_dir named by a hash of the path, taken in sorted order), so two processes never
    write the same output at once: the second waits for the first. Released on exit,
    also when the process is killed. The path is taken relative to lock_dir's parent (the
    store), so hosts that mount the store at different paths take the same lock."""
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        for key, file in sorted({(lock_key(p, lock_dir), lock_file(p, lock_dir)) for p in paths}):
            lock = stack.enter_context(open(file, "a"))
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.warning("waiting for another process that is writing %s", key)
                fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def lock_key(path: str | Path, lock_dir: str | Path) -> str:
    """What `exclusive` locks `path` by: its path within the store (lock_dir's parent)."""
    return os.path.relpath(os.path.realpath(path), os.path.realpath(Path(lock_dir).parent))


def lock_file(path: str | Path, lock_dir: str | Path) -> Path:
    """The file whose flock is `exclusive`'s lock on `path`."""
    return Path(lock_dir) / f"{short_hash(lock_key(path, lock_dir), 16)}.lock"


def being_written(path: str | Path, lock_dir: str | Path) -> bool:
    """Whether a process holds `exclusive`'s lock on `path` now (is writing it)."""
    lock = lock_file(path, lock_dir)
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def set_aside(path: str | Path) -> Path:
    """Rename a refused file out of the way (kept for inspection, never read again)."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.refused-{time.time_ns()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another worker set it aside first
        pass
    return aside


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: str | Path, value: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def write_once(path: str | Path, value: dict) -> dict:
    """Write `value` as JSON at `path` unless a file is there already (another process wrote
    it first, or an earlier run did); return what the file holds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
        os.link(tmp, path)  # fails where the file exists: the first one written stays
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno in FAILED_WRITES:
            raise write_failure(path, exc) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return read_json(path)


def check_store(root: str | Path) -> None:
    """Refuse a store (UNLIB_STORE, default ./store) that is not a writable folder, or that
    cannot be created, before any work starts."""
    root = Path(root)
    fix = "point UNLIB_STORE at a folder you can write (it is created if missing)"
    if root.exists():
        if not root.is_dir():
            raise UserError(f"the store {root} (UNLIB_STORE) is a file, not a folder; {fix}")
        if not os.access(root, os.W_OK | os.X_OK):
            raise UserError(f"the store {root} (UNLIB_STORE) is not writable (read-only file system or "
                            f"permissions); {fix}")
        return
    parent = next(p for p in root.absolute().parents if p.exists())
    if not parent.is_dir():
        raise UserError(f"the store {root} (UNLIB_STORE) cannot be created: {parent} is a file, not a folder; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"the store {root} (UNLIB_STORE) cannot be created: {parent} is not writable; {fix}")
