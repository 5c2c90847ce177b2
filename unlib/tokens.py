"""Token files: documents tokenized into one stream (the toy zoo's training data) or into
BOS-led sequences of analysed positions, written and read with their checksums."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from unlib.dataset import DatasetError
from unlib.engine.halves import HalfSplit
from unlib.exclusion import kept_positions
from unlib.h5read import H5Reader, read_h5
from unlib.h5write import write_h5

DEFAULT_N_TOKENS = 100_000  # analysed positions of a run (N_TOKENS)
# Held-out tokens come from at least this many documents where the dataset has them: each
# document gives at most 1/HELD_OUT_SPREAD of them (or one sequence, if that is more)
HELD_OUT_SPREAD = 50
# How held-out files are drawn (held_out_stream), recorded in them: a file drawn another way is not reused
HELD_OUT_RULE = f"the documents after the analysed ones, each cut to max(one sequence, 1/{HELD_OUT_SPREAD} of the tokens)"


def token_stream(texts: Iterable[str | np.ndarray], tokenizer, separator_id: int) -> Iterator[np.ndarray]:
    """Token ids of each document followed by the separator token. Token ids are split into
    documents at the separator (so a token stream given as one array keeps its documents,
    which the ablation's held-out tokens are drawn by), and each is taken as it is."""
    for text in texts:
        if text is None or isinstance(text, str) and not text:
            continue
        if isinstance(text, str):
            documents = [np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)]
        else:
            ids = np.asarray(text, dtype=np.int64)
            if len(ids) and ids.max() >= len(tokenizer):
                raise DatasetError(f"token id {ids.max()} is not in the tokenizer's vocabulary ({len(tokenizer)} "
                                   f"tokens): the token ids must come from the models' own tokenizer")
            documents = np.split(ids, np.flatnonzero(ids == separator_id))
            documents = [d[1:] if len(d) and d[0] == separator_id else d for d in documents]
        for ids in documents:
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


def packed_rows(stream: Iterator[np.ndarray], bos_id: int, ctx_len: int) -> Iterator[tuple[np.ndarray, int]]:
    """BOS-led rows of `ctx_len` tokens packed from a token stream (documents run across
    rows), each with how many documents the rows so far have begun; ends when the stream does."""
    per_seq = ctx_len - 1
    buffer, begun = np.zeros(0, dtype=np.int32), 0
    while True:
        while len(buffer) < per_seq:
            ids = next(stream, None)
            if ids is None:
                return
            buffer = np.concatenate([buffer, ids])
            begun += 1
        yield np.concatenate([[bos_id], buffer[:per_seq]]).astype(np.int32), begun
        buffer = buffer[per_seq:]


def held_out_stream(stream: Iterator[np.ndarray], bos_id: int, ctx_len: int, exclude_ids: list[int],
                    skip_tokens: int, n_tokens: int) -> Iterator[np.ndarray]:
    """The ablation's documents: those after every document that the analysed file of
    `skip_tokens` kept positions touches (it is packed again here to find them), each cut to
    held_out_cap tokens and the separator, so that `n_tokens` held-out tokens come from many
    documents however long some are, and share none with the analysed ones."""
    skipped = 0
    for row, _ in packed_rows(stream, bos_id, ctx_len):
        skipped += int(kept_positions(row[None], exclude_ids).sum())
        if skipped >= skip_tokens:
            break
    # the stream now stands after the last document the analysed rows begun
    cap = held_out_cap(ctx_len, n_tokens)
    for ids in stream:
        yield np.append(ids[:-1][:cap], bos_id).astype(np.int32)


def held_out_cap(ctx_len: int, n_tokens: int) -> int:
    """The most tokens one held-out document gives: 1/HELD_OUT_SPREAD of `n_tokens`, or one
    sequence's worth (ctx_len - 2 and the separator) if that is more."""
    return max(ctx_len - 2, -(-n_tokens // HELD_OUT_SPREAD))


def token_sequences(texts: Iterable[str | np.ndarray], tokenizer, bos_id: int, n_tokens: int, ctx_len: int,
                    exclude_ids: list[int], skip_tokens: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Tokenize `texts` into BOS-led sequences of `ctx_len` tokens holding exactly `n_tokens`
    kept (analysed) positions: (tokens, keep mask, counts: positions, and the documents the
    sequences draw on). With `skip_tokens`, held-out tokens instead: from the documents after
    those a file of `skip_tokens` kept positions draws on, each cut short (held_out_stream)."""
    stream = token_stream(texts, tokenizer, bos_id)
    if skip_tokens:
        stream = held_out_stream(stream, bos_id, ctx_len, exclude_ids, skip_tokens, n_tokens)
    rows, kept, documents = [], 0, 0
    for row, documents in packed_rows(stream, bos_id, ctx_len):
        rows.append(row)
        kept += int(kept_positions(row[None], exclude_ids).sum())
        if kept >= n_tokens:
            break
    if kept < n_tokens:
        after = f" after the documents of the {skip_tokens} analysed ones" if skip_tokens else ""
        raise DatasetError(f"dataset yields only {kept} analysed tokens{after}, fewer than the {n_tokens} asked "
                           f"for; lower N_TOKENS{' or ABLATION_TOKENS' if skip_tokens else ''} or use a larger "
                           f"dataset")
    tokens = np.stack(rows)
    keep = kept_positions(tokens, exclude_ids)
    excluded = int((~keep[:, 1:]).sum())
    surplus = kept - n_tokens  # kept positions past the budget, at the end of the last sequence
    if surplus:
        last = np.flatnonzero(keep[-1])[-surplus:]
        keep[-1, last] = False
    counts = {"n_sequences": len(tokens), "analysed_tokens": n_tokens, "positions": int(tokens.size),
              "dropped_bos_column": len(tokens), "dropped_excluded": excluded, "dropped_past_budget": surplus,
              "n_documents": documents}
    return tokens, keep, counts


def write_token_sequences(path: str | Path, texts: Iterable[str | np.ndarray], tokenizer, bos_id: int,
                          n_tokens: int, ctx_len: int, exclude_ids: list[int], attrs: dict,
                          skip_tokens: int = 0) -> dict:
    """The token_sequences of `texts`, written with their `keep` mask to an HDF5 file.
    Returns the position counts recorded in the file."""
    tokens, keep, counts = token_sequences(texts, tokenizer, bos_id, n_tokens, ctx_len, exclude_ids, skip_tokens)
    write_tokens(path, tokens, {**attrs, **counts, "bos_id": bos_id, "exclude_ids": exclude_ids}, keep)
    return counts


def document_starts(tokens: np.ndarray, keep: np.ndarray, separator_id: int) -> np.ndarray:
    """The analysed rows (kept positions, in order) at which a document begins after the
    first: a document ends with the separator, which column 0 (each sequence's BOS) is not.
    Read 8,192 sequences at a time, so a file of 100M tokens needs no stream-long array."""
    starts = [np.zeros(0, dtype=np.int64)]
    rows_before = 0
    for s in range(0, len(tokens), 8192):
        block, kept = tokens[s:s + 8192], keep[s:s + 8192]
        seq, col = np.nonzero(block[:, 1:] == separator_id)
        col += 1
        # kept positions before this block, in the sequences before the separator's, and up to it in its own
        per_seq = np.concatenate([[0], np.cumsum(kept.sum(axis=1))])
        within = np.cumsum(kept, axis=1)
        starts.append(rows_before + per_seq[seq] + within[seq, col])
        rows_before += int(per_seq[-1])
    return np.concatenate(starts)


def document_halves(tokens: np.ndarray, keep: np.ndarray) -> HalfSplit:
    """The split-half halves of BOS-led sequences' analysed rows: whole documents (HalfSplit),
    the BOS of column 0 being also the separator that ends a document."""
    return HalfSplit.by_document(document_starts(tokens, keep, int(tokens[0, 0])), int(keep.sum()))


def halves_of(path: str | Path) -> HalfSplit:
    """The document_halves of a token file."""
    return document_halves(*read_tokens(path))


def read_tokens(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(token ids (sequences, ctx_len), boolean mask of the analysed positions) of a token
    file, verified against their checksums."""
    arrays, _ = read_h5(path)
    return arrays["tokens"], arrays["keep"]


POSITION_COUNTS = ("n_sequences", "positions", "analysed_tokens", "dropped_bos_column", "dropped_excluded",
                   "dropped_past_budget")


def token_file_record(path: str | Path) -> dict:
    """What a token file records about its positions: the excluded ids, how many positions
    were analysed and dropped (and why), and how many documents they come from (None in a
    file from before that was recorded)."""
    with H5Reader(path) as reader:
        attrs = reader.attrs
    return {"exclude_ids": [int(i) for i in attrs["exclude_ids"]], "counts": {k: int(attrs[k]) for k in POSITION_COUNTS},
            "n_documents": int(attrs["n_documents"]) if "n_documents" in attrs else None}


def write_token_stream(path: str | Path, texts: Iterable[str], tokenizer, separator_id: int,
                       max_tokens: int, attrs: dict) -> int:
    """Write one flat stream of token ids (training data) and return its length."""
    stream = first_tokens(texts, tokenizer, separator_id, max_tokens)
    write_tokens(path, stream, attrs)
    return len(stream)
