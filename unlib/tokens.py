"""Token files: documents tokenized into one stream (the toy zoo's training data) or into
BOS-led sequences of analysed positions, written and read with their checksums."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from unlib.dataset import DatasetError
from unlib.exclusion import kept_positions
from unlib.h5read import H5Reader, read_h5
from unlib.h5write import write_h5

DEFAULT_N_TOKENS = 100_000  # analysed positions of a run (N_TOKENS)


def token_stream(texts: Iterable[str | np.ndarray], tokenizer, separator_id: int) -> Iterator[np.ndarray]:
    """Token ids of each document followed by the separator token. A document of token ids
    is taken as it is, less a leading separator (the BOS a tokenizer may have put there)."""
    for text in texts:
        if text is None or isinstance(text, str) and not text:
            continue
        if isinstance(text, str):
            ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        else:
            ids = np.asarray(text, dtype=np.int64)
            ids = ids[1:] if len(ids) and ids[0] == separator_id else ids
            if len(ids) and ids.max() >= len(tokenizer):
                raise DatasetError(f"token id {ids.max()} is not in the tokenizer's vocabulary ({len(tokenizer)} "
                                   f"tokens): the token ids must come from the models' own tokenizer")
        if len(ids):
            yield np.append(ids, separator_id).astype(np.int32)


def first_tokens(texts: Iterable[str], tokenizer, separator_id: int, n: int) -> np.ndarray:
    """The first n tokens of the documents joined by the separator (fewer if they run out)."""
    chunks, have = [], 0
    for ids in token_stream(texts, tokenizer, separator_id):
        chunks.append(ids)
        have += len(ids)
        if have >= n:
            break
    return np.concatenate(chunks)[:n] if chunks else np.zeros(0, dtype=np.int32)


def write_tokens(path: str | Path, tokens: np.ndarray, attrs: dict, keep: np.ndarray | None = None) -> None:
    """Write a token array (dataset `tokens`, and `keep` when given) and its attributes
    atomically, with their checksums."""
    write_h5(path, {"tokens": tokens, **({} if keep is None else {"keep": keep})}, attrs)


def token_sequences(texts: Iterable[str | np.ndarray], tokenizer, bos_id: int, n_tokens: int, ctx_len: int,
                    exclude_ids: list[int], skip_tokens: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Tokenize `texts` into BOS-led sequences of `ctx_len` tokens holding exactly `n_tokens`
    kept (analysed) positions: (tokens, keep mask, position counts). With `skip_tokens`, the
    sequences that a file of `skip_tokens` kept positions holds are skipped first, so the
    result continues the same stream with none of that file's positions (held-out tokens)."""
    per_seq = ctx_len - 1
    stream = token_stream(texts, tokenizer, bos_id)
    buffer, rows, kept, skipped = np.zeros(0, dtype=np.int32), [], 0, 0
    while kept < n_tokens:
        while len(buffer) < per_seq:
            ids = next(stream, None)
            if ids is None:
                after = f" after the {skip_tokens} analysed before them" if skip_tokens else ""
                raise DatasetError(f"dataset yields only {kept} analysed tokens{after}, fewer than the {n_tokens} asked "
                                   f"for; lower N_TOKENS{' or ABLATION_TOKENS' if skip_tokens else ''} or use a larger "
                                   f"dataset")
            buffer = np.concatenate([buffer, ids])
        row = np.concatenate([[bos_id], buffer[:per_seq]]).astype(np.int32)
        buffer = buffer[per_seq:]
        in_row = int(kept_positions(row[None], exclude_ids).sum())
        if skipped < skip_tokens:  # a sequence of the file being skipped
            skipped += in_row
            continue
        rows.append(row)
        kept += in_row
    tokens = np.stack(rows)
    keep = kept_positions(tokens, exclude_ids)
    excluded = int((~keep[:, 1:]).sum())
    surplus = kept - n_tokens  # kept positions past the budget, at the end of the last sequence
    if surplus:
        last = np.flatnonzero(keep[-1])[-surplus:]
        keep[-1, last] = False
    counts = {"n_sequences": len(tokens), "analysed_tokens": n_tokens, "positions": int(tokens.size),
              "dropped_bos_column": len(tokens), "dropped_excluded": excluded, "dropped_past_budget": surplus}
    return tokens, keep, counts


def write_token_sequences(path: str | Path, texts: Iterable[str | np.ndarray], tokenizer, bos_id: int,
                          n_tokens: int, ctx_len: int, exclude_ids: list[int], attrs: dict,
                          skip_tokens: int = 0) -> dict:
    """The token_sequences of `texts`, written with their `keep` mask to an HDF5 file.
    Returns the position counts recorded in the file."""
    tokens, keep, counts = token_sequences(texts, tokenizer, bos_id, n_tokens, ctx_len, exclude_ids, skip_tokens)
    write_tokens(path, tokens, {**attrs, **counts, "bos_id": bos_id, "exclude_ids": exclude_ids}, keep)
    return counts


def read_tokens(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(token ids (sequences, ctx_len), boolean mask of the analysed positions) of a token
    file, verified against their checksums."""
    arrays, _ = read_h5(path)
    return arrays["tokens"], arrays["keep"]


POSITION_COUNTS = ("n_sequences", "positions", "analysed_tokens", "dropped_bos_column", "dropped_excluded",
                   "dropped_past_budget")


def token_file_record(path: str | Path) -> dict:
    """What a token file records about its positions: the excluded ids, and how many
    positions were analysed and dropped (and why)."""
    with H5Reader(path) as reader:
        attrs = reader.attrs
    return {"exclude_ids": [int(i) for i in attrs["exclude_ids"]], "counts": {k: int(attrs[k]) for k in POSITION_COUNTS}}


def write_token_stream(path: str | Path, texts: Iterable[str], tokenizer, separator_id: int,
                       max_tokens: int, attrs: dict) -> int:
    """Write one flat stream of token ids (training data) and return its length."""
    stream = first_tokens(texts, tokenizer, separator_id, max_tokens)
    write_tokens(path, stream, attrs)
    return len(stream)
