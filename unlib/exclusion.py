"""Token exclusion: the EXCLUDE_TOKENS value, the token ids it names, and the analysed positions."""
from __future__ import annotations

import numpy as np

from unlib.dataset import DatasetError

# Named special tokens EXCLUDE_TOKENS understands besides ids and token strings.
SPECIAL_NAMES = ("bos", "eos", "pad", "newline")


def parse_exclusion(text: str) -> list[str]:
    """The items of an EXCLUDE_TOKENS value (comma-separated: token ids, the names bos, eos,
    pad, newline, or token strings with Python escapes such as \\n; `none` for none)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if items == ["none"]:
        return []
    for item in items:
        try:
            decoded = item.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError:
            raise DatasetError(f"EXCLUDE_TOKENS item {item!r} is not a valid escaped string") from None
        if not decoded:
            raise DatasetError(f"EXCLUDE_TOKENS item {item!r} is empty")
    return items


def exclusion_ids(text: str, tokenizer) -> list[int]:
    """Token ids whose positions are dropped from every activation, from an EXCLUDE_TOKENS
    value. A name the tokenizer lacks (e.g. no pad token) is skipped; a string must be
    exactly one token."""
    ids = set()
    for item in parse_exclusion(text):
        if item.isdigit():
            ids.add(int(item))
            if int(item) >= len(tokenizer):
                raise DatasetError(f"EXCLUDE_TOKENS item {item} is not a token id: the vocabulary has "
                                   f"{len(tokenizer)} tokens")
        elif item in SPECIAL_NAMES:
            if item == "newline":
                found = tokenizer("\n", add_special_tokens=False)["input_ids"]
                ids.update(found if len(found) == 1 else [])
            else:
                found = getattr(tokenizer, f"{item}_token_id")
                ids.update([] if found is None else [found])
        else:
            decoded = item.encode("latin-1", "backslashreplace").decode("unicode_escape")
            found = tokenizer(decoded, add_special_tokens=False)["input_ids"]
            if len(found) != 1:
                raise DatasetError(f"EXCLUDE_TOKENS item {item!r} is {len(found)} tokens, not one; give a single "
                                   f"token's text or its id")
            ids.add(found[0])
    return sorted(ids)


def kept_positions(tokens: np.ndarray, exclude_ids: list[int]) -> np.ndarray:
    """Boolean mask of the analysed positions of BOS-led sequences: all but column 0 and
    the positions holding an excluded token id."""
    keep = ~np.isin(tokens, np.asarray(exclude_ids, dtype=tokens.dtype))
    keep[:, 0] = False
    return keep
