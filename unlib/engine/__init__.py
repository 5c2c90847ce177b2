"""The correlation engine.

For every neuron of a reference model it finds, in each other model, the best-correlated
neuron (Pearson over the same tokens) and the best correlation after that model's
activations are rotated within each layer by Haar-random orthogonal matrices.

How it stays fast and exact:
- activations arrive in token chunks; each chunk's centred cross-product is one GEMM,
  merged into the running co-moments with Chan's parallel update (no E[xy]-E[x]E[y]);
- rotations are applied after the stream: corr with rotated activations needs only
  C[:, layer] @ Q and the rotated variances diag(Q^T S Q), S being the other model's
  within-layer co-moment, so R rotations cost R small matmuls, not R passes;
- for the split-half error every co-moment (and mean and count) is kept for two halves of
  the rows, each a set of whole documents (halves: a HalfSplit, by row index, whatever the
  feed's chunking): each row enters one half only, so the stream does no extra arithmetic,
  and the full-sample co-moment is the exact Chan merge of the halves, formed at reduce time.

Its modules, one step each: layout (where a layer's neurons are, which layers a pass reads
and rotates), halves (which half each row is in), memory (budgets and chunk sizes),
planning (passes and groups of work, their memory and FLOPs), comoments (the stream),
rotations (Haar draws), reduction (co-moments to max and baseline correlations), results
(per-pass and per-layer results, merged in plan order), tables (the excess-correlation
tables) and engine (the planned passes, run).
"""
