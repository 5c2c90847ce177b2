"""Text datasets and tokenized token files.

The default dataset is the offline corpus: the Python standard library's own `.py`
source and the `pydoc_data` documentation text, present on every Python install.
Files are split into train and held-out parts by a hash of their path, so analysis
tokens never overlap what the toy zoo was trained on.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import datasets
import h5py
import numpy as np

from unlib import UserError
from unlib.store import atomic_path

OFFLINE_CORPUS = "python-stdlib"
HELD_OUT_FRACTION = 10  # one file in ten goes to the held-out split


class DatasetError(UserError):
    """A dataset that cannot be found or read."""


def _is_held_out(relative_path: str) -> bool:
    return int(hashlib.sha1(relative_path.encode()).hexdigest(), 16) % HELD_OUT_FRACTION == 0


def offline_corpus(split: str) -> datasets.Dataset:
    """The standard-library corpus as a `datasets.Dataset` with a `text` column.

    split: "train" or "heldout".
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, names = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in path.parts or _is_held_out(rel) != (split == "heldout"):
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


LOCAL_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def local_files(dataset: str) -> list[Path] | None:
    """The files of a local dataset (comma-separated paths), or None for a hub name."""
    paths = [Path(p).expanduser() for p in dataset.split(",")]
    if any(p.suffix in LOCAL_KINDS or p.exists() or str(p).startswith(("/", ".")) for p in paths):
        return paths
    return None


def check_dataset(dataset: str) -> None:
    """Refuse a dataset that cannot be read, before any work starts."""
    if dataset == OFFLINE_CORPUS:
        return
    paths = local_files(dataset)
    if paths is not None:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"dataset file(s) not found: {', '.join(missing)}; give existing "
                               f".txt/.jsonl/.json/.parquet files, a Hugging Face dataset name, or {OFFLINE_CORPUS}")
        if len({p.suffix for p in paths}) != 1 or paths[0].suffix not in LOCAL_KINDS:
            raise DatasetError(f"local dataset files must all be one of {', '.join(LOCAL_KINDS)}: {dataset}")
        return
    import huggingface_hub

    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        datasets.load_dataset_builder(dataset)
    except Exception as exc:  # the hub raises many types; the user needs one line
        raise DatasetError(f"cannot load dataset {dataset!r}: {type(exc).__name__}: {str(exc).splitlines()[0]} "
                           f"(offline: use local files or {OFFLINE_CORPUS})") from exc


def load_texts(dataset: str, split: str = "heldout") -> Iterable[str]:
    """Documents of a dataset: the offline corpus, local text/jsonl/json/parquet files
    (comma-separated), or a Hugging Face dataset name (train split, streamed)."""
    datasets.disable_progress_bars()
    if dataset == OFFLINE_CORPUS:
        return offline_corpus(split)["text"]
    paths = local_files(dataset)
    if paths is not None:
        check_dataset(dataset)
        builder = LOCAL_KINDS[paths[0].suffix]
        ds = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train")
        if "text" not in ds.column_names:
            raise DatasetError(f"dataset {dataset} has no 'text' column (columns: {ds.column_names})")
        return ds["text"]
    try:
        ds = datasets.load_dataset(dataset, split="train", streaming=True)
    except Exception as exc:  # the hub raises many types; the user needs one line
        raise DatasetError(f"cannot load dataset {dataset!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return (row["text"] for row in ds)


def token_stream(texts: Iterable[str], tokenizer, separator_id: int) -> Iterator[np.ndarray]:
    """Token ids of each document followed by the separator token."""
    for text in texts:
        if text:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            yield np.asarray(ids + [separator_id], dtype=np.int32)


def first_tokens(texts: Iterable[str], tokenizer, separator_id: int, n: int) -> np.ndarray:
    """The first n tokens of the documents joined by the separator (fewer if they run out)."""
    chunks, have = [], 0
    for ids in token_stream(texts, tokenizer, separator_id):
        chunks.append(ids)
        have += len(ids)
        if have >= n:
            break
    return np.concatenate(chunks)[:n] if chunks else np.zeros(0, dtype=np.int32)


def write_tokens(path: str | Path, tokens: np.ndarray, attrs: dict) -> None:
    """Write a token array (dataset `tokens`) and its attributes atomically."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("tokens", data=tokens)
            for k, v in attrs.items():
                f.attrs[k] = v


def write_token_sequences(path: str | Path, texts: Iterable[str], tokenizer, bos_id: int,
                          n_tokens: int, ctx_len: int, attrs: dict) -> None:
    """Tokenize `texts` into sequences of `ctx_len` tokens that start with BOS, enough for
    `n_tokens` analysed (non-BOS) positions, and write them to an HDF5 file `tokens`."""
    per_seq = ctx_len - 1
    n_seq = -(-n_tokens // per_seq)
    needed = n_seq * per_seq
    body = first_tokens(texts, tokenizer, bos_id, needed)
    if len(body) < needed:
        raise DatasetError(f"dataset yields only {len(body)} tokens, fewer than the {needed} asked for; "
                           f"lower N_TOKENS or use a larger dataset")
    seqs = np.concatenate([np.full((n_seq, 1), bos_id, dtype=np.int32), body.reshape(n_seq, per_seq)], axis=1)
    write_tokens(path, seqs, {**attrs, "bos_id": bos_id, "n_sequences": n_seq, "analysed_tokens": needed})


def read_tokens(path: str | Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["tokens"][:]


def write_token_stream(path: str | Path, texts: Iterable[str], tokenizer, separator_id: int,
                       max_tokens: int, attrs: dict) -> int:
    """Write one flat stream of token ids (training data) and return its length."""
    stream = first_tokens(texts, tokenizer, separator_id, max_tokens)
    write_tokens(path, stream, attrs)
    return len(stream)
