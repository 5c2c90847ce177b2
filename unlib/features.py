"""Binary features of the analysed tokens, which explain neurons' activations (unlib.explain):
token identity, token classes read from the tokenizer alone, position in the context and in the
line, and syntax (Python's own `tokenize` classes where the text is Python, and bracket depth,
line and sentence starts for any text), each token feature also for the previous token.

Every feature is one category of a categorical variable (a code per analysed position, -1 for
none), so that counting and summing activations per feature is one scatter-add per variable.
The previous token is the one before in the same sequence (the sequence's BOS at position 1),
never the last token of the sequence before."""
from __future__ import annotations

import dataclasses
import io
import keyword
import string
import tokenize

import numpy as np

# The family a feature's group explains a neuron as (the paper's Section 4 names).
GROUP_FAMILY = {"token": "unigram", "letter": "alphabet", "class": "token class", "prev token": "previous token",
                "prev letter": "previous token", "prev class": "previous token", "position": "position",
                "column": "position", "indent": "position", "syntax": "syntax", "python": "syntax",
                "prev syntax": "syntax", "prev python": "syntax"}
TOKEN_CLASSES = ("alphabetic", "digits", "whitespace", "newline", "leading space", "capitalised", "punctuation")
SYNTAX_FLAGS = ("inside brackets", "start of line", "start of sentence", "continues a word")
PYTHON_CLASSES = ("NAME", "keyword", "OP", "NUMBER", "STRING", "COMMENT", "NEWLINE")
MAX_INDENT = 6  # indentation depths (in steps of 4 columns) above this count as this one
OPENERS, CLOSERS = "([{", ")]}"


@dataclasses.dataclass
class Variable:
    """A categorical variable over the analysed positions: `codes` (n,) in [0, len(names)) or -1."""

    group: str
    names: list[str]
    codes: np.ndarray


@dataclasses.dataclass
class TokenFeatures:
    """The variables of one token file's analysed positions, in the order of its kept rows."""

    variables: list[Variable]
    positions: np.ndarray  # (n,) position of each analysed row in its sequence
    n_python_documents: int  # documents Python's tokenize read to their end
    n_documents: int


def token_pieces(tokenizer) -> list[str]:
    """The text each token id adds after another token: decoded after a fixed first token and
    that token's text cut off, because a SentencePiece tokenizer (Llama's) drops the leading
    space of a text's first token, and a token's space is what separates words."""
    first = tokenizer("a", add_special_tokens=False)["input_ids"][0]
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    start = len(decode([first]))
    return [decode([first, i])[start:] for i in range(len(tokenizer))]


def normalised(piece: str, merges: bool) -> str:
    """A token's identity as a feature: with a BPE vocabulary the paper's normalised unigram
    (lower-cased, stripped: " The" and "the" are one word), a byte vocabulary's bytes as they are
    (case-folding them is the alphabet feature)."""
    return piece.strip().lower() or piece if merges else piece


def vocabulary_codes(pieces: list[str], bos: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per token id: its identity, first letter (case-folded) and class codes, {group: (names,
    codes)}; a class is a multi-hot, so each class is its own one-category variable here."""
    merges = any(len(p) > 1 for i, p in enumerate(pieces) if i != bos)
    identities = sorted({normalised(p, merges) for p in pieces})
    index = {name: i for i, name in enumerate(identities)}
    out = {"token": ([repr(n) for n in identities], np.array([index[normalised(p, merges)] for p in pieces]))}
    letters = list(string.ascii_lowercase)
    first = [p.lstrip()[:1].lower() for p in pieces]
    out["letter"] = ([f"starts with {c}" for c in letters],
                     np.array([letters.index(c) if c and c in letters else -1 for c in first]))
    tests = {"alphabetic": lambda s, p: s.isalpha(), "digits": lambda s, p: s.isdigit(),
             "whitespace": lambda s, p: p != "" and not s, "newline": lambda s, p: "\n" in p,
             "leading space": lambda s, p: p.startswith(" "), "capitalised": lambda s, p: s[:1].isupper(),
             "punctuation": lambda s, p: s != "" and all(c in string.punctuation for c in s)}
    for name in TOKEN_CLASSES:
        out[f"class {name}"] = ([name], np.array([0 if tests[name](p.strip(), p) else -1 for p in pieces]))
    return out


def _threshold_codes(values: np.ndarray, cuts: list[int], label: str) -> list[tuple[str, np.ndarray]]:
    return [(f"{label} <= {c}", np.where(values <= c, 0, -1)) for c in cuts]


def _cuts(limit: int) -> list[int]:
    """Cut points for threshold features below `limit`: powers of two and eighths of it."""
    powers = [2 ** k for k in range(int(np.log2(max(limit, 2))) + 1)]
    return sorted({c for c in powers + [limit * k // 8 for k in range(1, 8)] if 0 < c < limit})


def _python_classes(text: str) -> tuple[np.ndarray, bool]:
    """Per character of `text`, the index in PYTHON_CLASSES of the Python token it lies in (-1
    outside any), and whether tokenize read the text to its end as Python: without an error
    and without a stray character (an ERRORTOKEN, which Python before 3.12 yields where 3.12
    raises: prose's apostrophes, `$`, `?`). The characters after an error have no class."""
    codes = np.full(len(text), -1, dtype=np.int8)
    line_starts = np.concatenate([[0], np.cumsum([len(line) for line in io.StringIO(text).readlines()])])
    complete = True
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NAME:
                name = "keyword" if keyword.iskeyword(tok.string) else "NAME"
            elif tok.type in (tokenize.NEWLINE, tokenize.NL):
                name = "NEWLINE"
            elif tok.type in (tokenize.OP, tokenize.NUMBER, tokenize.STRING, tokenize.COMMENT):
                name = tokenize.tok_name[tok.type]
            elif tokenize.tok_name[tok.type].startswith("FSTRING"):
                name = "STRING"
            else:
                complete &= tok.type != tokenize.ERRORTOKEN or not tok.string.strip()
                continue
            (r0, c0), (r1, c1) = tok.start, tok.end
            if r0 - 1 >= len(line_starts) - 1 and name != "NEWLINE":
                continue
            start = line_starts[min(r0 - 1, len(line_starts) - 1)] + c0
            stop = line_starts[min(r1 - 1, len(line_starts) - 1)] + c1
            codes[start:max(stop, start + 1)] = PYTHON_CLASSES.index(name)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        complete = False
    return codes[:len(text)], complete


def _document_features(pieces: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per token of one document (ids, without its separator): column in its line, indentation
    depth, the generic syntax flags and its Python class, from the document's text."""
    lengths = np.array([len(pieces[i]) for i in ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    text = "".join(pieces[i] for i in ids)
    if not text:  # tokens that decode to nothing (special tokens): no text feature
        none = np.zeros(len(ids), dtype=bool)
        return {"column": np.zeros(len(ids), np.int64), "indent": np.zeros(len(ids), np.int64),
                **{name: none for name in SYNTAX_FLAGS}, "python": np.full(len(ids), -1), "python_complete": False}
    chars = np.array(list(text))
    n = len(text)
    newline = chars == "\n"
    # index of the last newline at or before each character (-1: none)
    last_newline = np.maximum.accumulate(np.where(newline, np.arange(n), -1))
    lines = text.split("\n")
    leads = [line[:len(line) - len(line.lstrip(" \t"))] for line in lines]
    lead_chars = np.array([len(lead) for lead in leads])
    indents = np.array([len(lead) + 3 * lead.count("\t") for lead in leads])  # a tab counts 4
    line_of = np.concatenate([[0], np.cumsum(newline)[:-1]])
    depth = np.cumsum(np.isin(chars, list(OPENERS)).astype(np.int64) - np.isin(chars, list(CLOSERS)))
    depth = depth - np.minimum(np.minimum.accumulate(depth), 0)  # a walk reflected at 0
    python, complete = _python_classes(text)
    stripped = np.array([len(pieces[i]) - len(pieces[i].lstrip()) for i in ids], dtype=np.int64)
    first = np.minimum(starts + stripped, max(n - 1, 0))  # the token's first visible character
    has_text = stripped < lengths
    column = starts - (np.where(starts > 0, last_newline[np.maximum(starts - 1, 0)], -1) + 1)
    indent = indents[line_of[first]]
    # the previous visible character before each token, for sentence starts
    visible = np.where(~np.isin(chars, [" ", "\t", "\n", "\r"]), np.arange(n), -1)
    last_visible = np.maximum.accumulate(visible)
    before = np.where(starts > 0, last_visible[np.maximum(starts - 1, 0)], -1)
    prev_char = np.where(before >= 0, chars[np.maximum(before, 0)], "")
    alnum = np.char.isalnum(chars)
    line_start_col = column <= lead_chars[line_of[first]]  # nothing but indentation before it on its line
    return {
        "column": column,
        "indent": np.minimum(indent // 4, MAX_INDENT),
        "inside brackets": (depth[np.maximum(starts - 1, 0)] > 0) & (starts > 0),
        "start of line": has_text & line_start_col,
        "start of sentence": has_text & ((before < 0) | np.isin(prev_char, [".", "!", "?"])),
        "continues a word": (starts > 0) & alnum[first] & alnum[np.maximum(starts - 1, 0)] & (stripped == 0),
        "python": np.where(has_text, python[first], -1),
        "python_complete": complete,
    }


def token_features(tokens: np.ndarray, keep: np.ndarray, pieces: list[str]) -> TokenFeatures:
    """The feature variables of a token file's analysed positions (tokens (sequences, ctx_len),
    BOS-led and packed from documents ended by the BOS id, as unlib.tokens writes them)."""
    n_seq, ctx = tokens.shape
    bos = int(tokens[0, 0])
    vocab = vocabulary_codes(pieces, bos)
    # context features per stream position (every column but the BOS), -1/False at the BOS
    stream = tokens[:, 1:].reshape(-1)
    context = {name: np.zeros(stream.shape, dtype=np.int64) for name in ("column", "indent", "python")}
    context["python"][:] = -1
    for name in SYNTAX_FLAGS:
        context[name] = np.zeros(stream.shape, dtype=bool)
    ends = np.flatnonzero(stream == bos)
    bounds = zip(np.concatenate([[0], ends + 1]), np.concatenate([ends, [len(stream)]]))
    n_documents = n_python = 0
    for start, stop in bounds:
        if stop <= start:
            continue
        found = _document_features(pieces, stream[start:stop])
        n_documents += 1
        n_python += bool(found.pop("python_complete"))
        for name, values in found.items():
            context[name][start:stop] = values
    grid = {name: np.concatenate([np.full((n_seq, 1), -1 if values.dtype != bool else False, dtype=values.dtype),
                                  values.reshape(n_seq, ctx - 1)], axis=1) for name, values in context.items()}

    def previous(values: np.ndarray, none) -> np.ndarray:
        out = np.full_like(values, none)
        out[:, 1:] = values[:, :-1]
        return out

    variables = []

    def add(group: str, names: list[str], codes: np.ndarray) -> None:
        variables.append(Variable(group, names, codes[keep].astype(np.int32)))

    for key, (names, per_id) in vocab.items():
        group = key.split(" ")[0]
        codes = per_id[tokens]
        if group != "token":
            codes[:, 0] = -1  # the BOS has no class or letter
        add(group, names, codes)
        add(f"prev {group}", [f"prev {n}" for n in names], previous(codes, -1))
    positions = np.broadcast_to(np.arange(ctx), tokens.shape)
    for name, codes in _threshold_codes(positions, _cuts(ctx), "position"):
        add("position", [name], codes)
    for name, codes in _threshold_codes(grid["column"], [0] + _cuts(max(ctx, 80)), "column"):
        add("column", [name], np.where(positions > 0, codes, -1))
    add("indent", [f"indent {k}" for k in range(MAX_INDENT + 1)], np.where(positions > 0, grid["indent"], -1))
    for name in SYNTAX_FLAGS:
        add("syntax", [name], np.where(grid[name], 0, -1))
        add("prev syntax", [f"prev {name}"], np.where(previous(grid[name], False), 0, -1))
    if n_python * 2 >= n_documents:  # Python text: its tokenize classes
        add("python", [f"python {n}" for n in PYTHON_CLASSES], grid["python"])
        add("prev python", [f"prev python {n}" for n in PYTHON_CLASSES], previous(grid["python"], -1))
    return TokenFeatures(variables, positions[keep].astype(np.int64), n_python, n_documents)
