"""Which half of the rows each token row is in, for the split-half error: halves made of whole
documents, so that they are independent samples, or (with no documents given) alternating
blocks of rows."""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from unlib.engine.layout import HALVES

# Rows per block without documents (even blocks form half A, odd blocks half B), the most
# rows merged into the co-moments at once (the plan's centred copy) and the least rows a
# group of consecutive documents holds, so that the stream's GEMMs stay large.
HALF_BLOCK_ROWS = 2048
MIN_HALF_ROWS = 1024  # the halves' results are NaN unless each half holds this many rows
# A document longer than 1/LONGEST_DOCUMENT of the rows is cut into equal pieces, so that
# the halves can hold about as many rows each.
LONGEST_DOCUMENT = 4
# How halves are made from documents, recorded with the correlations (part of their key)
DOCUMENT_RULE = (f"whole documents (one longer than 1/{LONGEST_DOCUMENT} of the rows cut into equal pieces), "
                 f"consecutive ones grouped to at least min({HALF_BLOCK_ROWS}, rows/8) rows, each group to the "
                 f"half with fewer rows so far")


@dataclasses.dataclass(frozen=True)
class HalfSplit:
    """The halves as groups of consecutive rows: group g holds rows [starts[g], starts[g+1])
    (the last one to the end) and is in half halves[g]. `starts` None: alternating blocks of
    HALF_BLOCK_ROWS rows, however many rows there are. With documents, how many there were
    (`documents`), how many were cut into pieces (`cut`) and how many each half holds in
    part or whole (`half_documents`)."""

    starts: np.ndarray | None = None
    halves: np.ndarray | None = None
    documents: int = 0
    cut: int = 0
    half_documents: tuple[int, int] = (0, 0)

    @classmethod
    def by_document(cls, document_starts: np.ndarray, n_rows: int) -> "HalfSplit":
        """Halves of whole documents for a stream of `n_rows` rows whose documents begin at
        the rows `document_starts` (row 0 always begins one). A document longer than
        n_rows / LONGEST_DOCUMENT is cut into equal pieces; consecutive pieces and documents
        form groups of at least min(HALF_BLOCK_ROWS, n_rows // 8) rows; each group goes to
        the half with fewer rows so far (A on a tie), so the halves differ by one group at
        most."""
        bounds = np.unique(np.concatenate([[0], np.asarray(document_starts, dtype=np.int64), [n_rows]]))
        bounds = bounds[(bounds >= 0) & (bounds <= n_rows)]
        longest = -(-n_rows // LONGEST_DOCUMENT)
        least = max(1, min(HALF_BLOCK_ROWS, n_rows // 8))
        group_starts, group_docs, cut = [], [], 0
        for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            pieces = -(-(hi - lo) // longest)
            cut += pieces > 1
            for j in range(pieces):
                start = lo + (hi - lo) * j // pieces
                if not group_starts or start - group_starts[-1] >= least:
                    group_starts.append(start)
                    group_docs.append(set())
                group_docs[-1].add(doc)
        halves, rows = [], [0, 0]
        ends = group_starts[1:] + [n_rows]
        docs: list[set[int]] = [set(), set()]
        for start, end, in_group in zip(group_starts, ends, group_docs):
            half = int(rows[1] < rows[0])
            halves.append(half)
            rows[half] += end - start
            docs[half] |= in_group
        return cls(np.asarray(group_starts, dtype=np.int64), np.asarray(halves, dtype=np.int8),
                   len(bounds) - 1, int(cut), (len(docs[0]), len(docs[1])))

    def segments(self, start: int, rows: int) -> Iterator[tuple[int, int, int]]:
        """(half, lo, hi) for the runs of a chunk's rows [lo, hi) that lie in one group and
        one block of HALF_BLOCK_ROWS rows, the chunk's first row being row `start` of the stream."""
        lo = 0
        while lo < rows:
            row = start + lo
            half, group_end = self.group_at(row)
            hi = min(rows, group_end - start, lo + HALF_BLOCK_ROWS - row % HALF_BLOCK_ROWS)
            yield half, lo, hi
            lo = hi

    def group_at(self, row: int) -> tuple[int, int]:
        """(half, first row after the group) of the group holding `row`."""
        if self.starts is None:
            return (row // HALF_BLOCK_ROWS) % HALVES, (row // HALF_BLOCK_ROWS + 1) * HALF_BLOCK_ROWS
        g = int(np.searchsorted(self.starts, row, side="right")) - 1
        end = int(self.starts[g + 1]) if g + 1 < len(self.starts) else np.iinfo(np.int64).max
        return int(self.halves[g]), end

    def record(self) -> dict:
        """What the split was, for run.json and the report."""
        if self.starts is None:
            return {"rule": f"alternating blocks of {HALF_BLOCK_ROWS} rows"}
        return {"rule": DOCUMENT_RULE, "documents": self.documents, "cut_documents": self.cut,
                "half_documents": list(self.half_documents), "groups": len(self.starts)}


BLOCKS = HalfSplit()  # no documents known: alternating blocks of HALF_BLOCK_ROWS rows
