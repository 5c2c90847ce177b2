"""Text datasets: a DATASET value parsed, checked and read as documents.

The default dataset is the offline corpus: the Python standard library's own `.py`
source and the `pydoc_data` documentation text, present on every Python install.
Files are split into train and held-out parts by a hash of their path, so analysis
tokens never overlap what the toy zoo was trained on.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import datasets
import numpy as np

from unlib import UserError
from unlib.hub import dataset_download, fetch_advice, offline_unless_reachable
from unlib.store import file_fingerprint, short_hash, slug

OFFLINE_CORPUS = "python-stdlib"
# The default text of hub model sets: a 10k-document sample of the Pile, as the paper used the Pile.
PILE_SAMPLE = "NeelNanda/pile-10k"
HELD_OUT_FRACTION = 10  # one file in ten goes to the held-out split


class DatasetError(UserError):
    """A dataset that cannot be found or read."""


def _is_held_out(relative_path: str) -> bool:
    return int(hashlib.sha1(relative_path.encode()).hexdigest(), 16) % HELD_OUT_FRACTION == 0


@functools.lru_cache(maxsize=2)
def offline_corpus(split: str) -> datasets.Dataset:
    """The standard-library corpus as a `datasets.Dataset` with a `text` column (read once
    per process).

    split: "train" or "heldout".
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d != "site-packages"]  # installed packages are not the stdlib
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    texts, names = [], []
    for path in sorted(files):
        rel = path.relative_to(root).as_posix()
        if _is_held_out(rel) != (split == "heldout"):
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        names.append(rel)
    from pydoc_data.topics import topics

    for key in sorted(topics):
        rel = f"pydoc_data/topics/{key}"
        if _is_held_out(rel) == (split == "heldout"):
            texts.append(topics[key])
            names.append(rel)
    return datasets.Dataset.from_dict({"text": texts, "source": names})


LOCAL_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".npy": "token ids"}
# A .npy file holds token ids instead of text: 1-D, one document; 2-D, one document per row.
TOKEN_IDS = ".npy"
# Documents are drawn in a random order fixed by this seed (recorded with every token file).
DOCUMENT_SEED = 0
# Streamed hub datasets are shuffled within a buffer of this many documents (and by shard).
SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A DATASET value: the offline corpus, local files, or a hub dataset `name[:config][@split]`."""

    name: str
    config: str | None = None
    split: str | None = None
    files: tuple[Path, ...] = ()

    @property
    def dataset_id(self) -> str:
        """Name of the dataset in the store (local files by their names and a hash of their paths)."""
        if self.files:
            # .txt files: the rule that splits them into documents is part of the key, so token
            # files made under another rule (one line per document, before) are not reused
            rule = [f"txt:{TXT_DOCUMENTS}"] if self.files[0].suffix == ".txt" else []
            return f"local-{slug(self.files[0].name)}-{short_hash([str(p.resolve()) for p in self.files] + rule)}"
        config = f":{self.config}" if self.config else ""
        return f"{self.name}{config}@{self.split}"


def parse_dataset(dataset: str) -> DatasetSpec:
    """Parse a DATASET value: `python-stdlib[@heldout|@train]`, comma-separated local
    .txt/.jsonl/.json/.parquet files (or .npy token ids), or a hub dataset
    `name[:config][@split]` (split: train)."""
    dataset = dataset.strip()
    paths = [Path(p).expanduser() for p in dataset.split(",")]
    if any(p.suffix in LOCAL_KINDS or p.exists() or str(p).startswith(("/", ".")) for p in paths):
        return DatasetSpec(dataset, files=tuple(paths))
    name, _, split = dataset.partition("@")
    name, _, config = name.partition(":")
    if name == OFFLINE_CORPUS:
        split = split or "heldout"
        if split not in ("heldout", "train") or config:
            raise DatasetError(f"DATASET={dataset!r}: the offline corpus has the splits heldout and train "
                               f"({OFFLINE_CORPUS} or {OFFLINE_CORPUS}@train) and no configs")
    if not name:
        raise DatasetError(f"DATASET={dataset!r} names no dataset: use name[:config][@split], local files, "
                           f"or {OFFLINE_CORPUS}")
    return DatasetSpec(name, config or None, split or "train")


def dataset_inputs(dataset: str) -> dict[str, str]:
    """The dataset's entry in a file's provenance: each local file by its content, the offline
    corpus by the Python version whose standard library it is, a hub dataset by its name."""
    spec = parse_dataset(dataset)
    if spec.files:
        return {f"dataset file {p.resolve()}": file_fingerprint(p) for p in spec.files}
    if spec.name == OFFLINE_CORPUS:
        return {"dataset": f"{spec.dataset_id} of Python {platform.python_version()}"}
    return {"dataset": spec.dataset_id}


# A .txt dataset holds one document per paragraph: paragraphs are separated by one or more
# blank (empty or whitespace-only) lines; the newlines inside a paragraph are kept.
TXT_DOCUMENTS = "paragraphs"
_BLANK_LINES = re.compile(r"\r?\n(?:[ \t\f\v]*\r?\n)+")


def txt_documents(text: str) -> list[str]:
    """The documents of a .txt dataset's text: its paragraphs (split on blank lines), in file
    order, without the line breaks around them; the newlines within each are kept."""
    docs = (doc.strip("\r\n") for doc in _BLANK_LINES.split(text))
    return [doc for doc in docs if doc.strip()]


def _problem(path: str, what: str) -> DatasetError:
    return DatasetError(f"dataset file {path} {what}")


def _decoded_lines(path: str, binary_hint: str) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset, text) of each line of a UTF-8 file, refusing undecodable or
    binary content by byte offset."""
    offset = 0
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise _problem(path, f"cannot be read ({exc.strerror or type(exc).__name__}); check its permissions") from None
    with f:
        head = f.peek(8192)[:8192] if hasattr(f, "peek") else b""
        if b"\0" in head:  # as git and grep tell binary files: a NUL byte near the start
            nul = head.index(b"\0")
            line = head[:nul].count(b"\n") + 1
            raise _problem(path, f"is binary, not text: a NUL byte at byte offset {nul} (line {line}){binary_hint}")
        for number, raw in enumerate(f, 1):
            nul = raw.find(b"\0")
            if nul >= 0:
                raise _problem(path, f"is binary, not text: a NUL byte at byte offset {offset + nul} (line {number})"
                                     f"{binary_hint}")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start:exc.start + 1].hex()
                raise _problem(path, f"is not UTF-8 text: byte 0x{bad} at byte offset {offset + exc.start} "
                                     f"(line {number}) does not decode; convert it to UTF-8, e.g. "
                                     f"`iconv -f latin1 -t utf-8`") from None
            yield number, offset, text
            offset += len(raw)


def _check_record(path: str, where: str, record) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        got = f"keys {sorted(record)[:5]}" if isinstance(record, dict) else type(record).__name__
        raise _problem(path, f"{where} is not a JSON object with a string 'text' field (got {got})")


@functools.lru_cache(maxsize=64)
def check_local_file(path: str, size: int, mtime_ns: int) -> None:
    """Refuse a local dataset file that cannot be read, is empty, is not UTF-8 text (naming
    the byte offset and line), or is malformed (.jsonl/.json: naming the line; .parquet: not
    Parquet or no 'text' column). Cached by (path, size, modification time)."""
    suffix = Path(path).suffix
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path)
        except OSError as exc:
            if isinstance(exc, (PermissionError, IsADirectoryError)):
                raise _problem(path, f"cannot be read ({exc.strerror}); check its permissions") from None
            raise _problem(path, f"is not a Parquet file ({str(exc).splitlines()[0]})") from None
        except Exception as exc:  # pyarrow's ArrowInvalid and friends
            raise _problem(path, f"is not a Parquet file ({str(exc).splitlines()[0]})") from None
        if "text" not in meta.schema_arrow.names:
            raise _problem(path, f"has no 'text' column (columns: {', '.join(meta.schema_arrow.names)})")
        if meta.metadata.num_rows == 0:
            raise _problem(path, "is empty (no rows)")
        return
    hint = "; give a UTF-8 text file"
    if suffix == ".txt":
        text = False
        for _, _, line in _decoded_lines(path, hint):  # every line: the whole file must decode
            text = text or bool(line.strip())
        if not text:
            raise _problem(path, "is empty: it holds no text")
        return
    if suffix == ".json":  # a JSON array of objects, or JSON lines under a .json name
        text = "".join(line for _, _, line in _decoded_lines(path, hint))
        if not text.strip():
            raise _problem(path, "is empty: it holds no documents")
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise _problem(path, f"is not valid JSON at line {exc.lineno}, column {exc.colno} "
                                     f"(byte offset {len(text[:exc.pos].encode())}): {exc.msg}") from None
        else:
            if isinstance(records, dict):  # one object: JSON lines of one line
                records = [records]
            if not isinstance(records, list):
                raise _problem(path, "is not a JSON array of {\"text\": ...} objects nor JSON lines")
            if not records:
                raise _problem(path, "is empty: it holds no documents")
            for i, record in enumerate(records):
                _check_record(path, f"item {i}", record)
            return
    documents = 0
    for number, offset, line in _decoded_lines(path, hint):
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            where = offset + len(line[:exc.pos].encode())
            raise _problem(path, f"line {number} is not valid JSON (column {exc.colno}, byte offset {where}: "
                                 f"{exc.msg}); a JSON-lines file holds one {{\"text\": ...}} object per line") from None
        _check_record(path, f"line {number}", record)
        documents += 1
    if not documents:
        raise _problem(path, "is empty: it holds no documents")


def check_dataset(dataset: str) -> None:
    """Refuse a dataset that cannot be read, before any work starts."""
    spec = parse_dataset(dataset)
    if spec.name == OFFLINE_CORPUS:
        return
    if spec.files:
        missing = [str(p) for p in spec.files if not p.exists()]
        if missing:
            raise DatasetError(f"dataset file(s) not found: {', '.join(missing)}; give existing "
                               f".txt/.jsonl/.json/.parquet files (or .npy token ids), a Hugging Face dataset name, "
                               f"or {OFFLINE_CORPUS}")
        folders = [str(p) for p in spec.files if not p.is_file()]
        if folders:
            raise DatasetError(f"dataset path(s) {', '.join(folders)} are not files; give .txt/.jsonl/.json/.parquet "
                               f"files, comma-separated")
        if len({p.suffix for p in spec.files}) != 1 or spec.files[0].suffix not in LOCAL_KINDS:
            raise DatasetError(f"local dataset files must all be one of {', '.join(LOCAL_KINDS)}: {dataset}")
        for path in spec.files:
            if path.suffix == TOKEN_IDS:
                read_token_ids(path)
            else:
                stat = path.stat()
                check_local_file(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        return
    import huggingface_hub

    huggingface_hub.utils.logging.set_verbosity_error()
    reachable = offline_unless_reachable()
    try:
        builder = datasets.load_dataset_builder(spec.name, spec.config)
    except Exception as exc:  # the hub raises many types; the user needs one line
        unreachable = "" if reachable else f"; the hub cannot be reached: {fetch_advice([dataset_download(spec.name)])}"
        raise DatasetError(f"cannot load dataset {spec.name!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                           f"{unreachable}; or use local files or {OFFLINE_CORPUS}") from exc
    splits = builder.info.splits
    if splits and spec.split not in splits:
        raise DatasetError(f"dataset {spec.name!r} has no split {spec.split!r}; it has: {', '.join(splits)} "
                           f"(DATASET=name[:config]@split)")


def read_token_ids(path: str | Path) -> np.ndarray:
    """The token ids of a .npy dataset file: non-negative integers, 1-D (one document) or
    2-D (one document per row)."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"cannot read token ids from {path}: {exc}") from None
    return check_token_ids(ids, str(path))


def check_token_ids(ids: np.ndarray, what: str) -> np.ndarray:
    """Refuse token ids that are not non-negative integers in 1 or 2 dimensions."""
    if ids.ndim not in (1, 2) or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
        raise DatasetError(f"{what} must hold non-negative integer token ids, 1-D (one document) or 2-D (one "
                           f"document per row); it holds {ids.dtype} of shape {ids.shape}")
    return ids


def load_texts(dataset: str, seed: int = DOCUMENT_SEED) -> Iterable[str | np.ndarray]:
    """Documents of a dataset in a random order fixed by `seed`, drawn across the whole
    dataset: the offline corpus, local files (comma-separated), or a hub dataset (streamed,
    shuffled by shard and within a buffer of SHUFFLE_BUFFER documents). Documents are texts,
    or arrays of token ids for .npy files."""
    datasets.disable_progress_bars()
    spec = parse_dataset(dataset)
    if spec.name == OFFLINE_CORPUS:
        return offline_corpus(spec.split).shuffle(seed=seed)["text"]
    if spec.files:
        check_dataset(dataset)
        if spec.files[0].suffix == TOKEN_IDS:
            documents = [doc for path in spec.files for doc in np.atleast_2d(read_token_ids(path))]
            return [documents[i] for i in np.random.default_rng(seed).permutation(len(documents))]
        if spec.files[0].suffix == ".txt":  # one document per paragraph, newlines kept (see txt_documents)
            texts = [doc for p in spec.files for doc in txt_documents(p.read_text(encoding="utf-8"))]
            return datasets.Dataset.from_dict({"text": texts}).shuffle(seed=seed)["text"]
        builder = LOCAL_KINDS[spec.files[0].suffix]
        ds = datasets.load_dataset(builder, data_files=[str(p) for p in spec.files], split="train")
        if "text" not in ds.column_names:
            raise DatasetError(f"dataset {dataset} has no 'text' column (columns: {ds.column_names})")
        return ds.shuffle(seed=seed)["text"]
    offline_unless_reachable()
    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
    except Exception as exc:  # the hub raises many types; the user needs one line
        raise DatasetError(f"cannot load dataset {spec.name!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return (row["text"] for row in ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER))
