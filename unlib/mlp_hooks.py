"""A loaded model's MLP neurons: their activations, read through TransformerLens hooks, and
their weights after HookedTransformer's default processing."""
from __future__ import annotations

import copy

import torch

def is_gated(model) -> bool:
    """Whether the model's MLP is gated (Llama-style: down(act(gate(x)) * up(x)))."""
    return "blocks.0.mlp.hook_pre_linear" in model.hook_dict


@torch.no_grad()
def processed_weights(model) -> dict[str, torch.Tensor]:
    """A bridge's MLP and unembedding weights after HookedTransformer's default processing (fold
    LayerNorm, centre writing weights, centre the unembedding), as float64 CPU tensors: W_in
    (layers, d_model, d_mlp), b_in (layers, d_mlp), W_out (layers, d_mlp, d_model), W_U (d_model, vocab)
    and the attention queries W_Q (layers, heads, d_model, d_head).
    For a gated MLP, W_in is the gate (what `hook_pre` reads) and b_in its bias, zero where the
    model has none; the up projection (`hook_pre_linear`) only scales the gated output."""
    # A copy is processed so that the caller's bridge keeps its raw weights, hooks and activations.
    processed = copy.deepcopy(model)
    # Not a bare process_weights(): that leaves the b_in alias on the unfolded bias (TransformerLens 4);
    # compatibility mode re-points the aliases at the processed tensors.
    processed.enable_compatibility_mode(disable_warnings=True)
    gated = is_gated(model)
    w_in = processed.W_gate if gated else processed.W_in
    try:  # a bias-free projection has no stacked bias (TransformerLens raises AttributeError)
        b_in = getattr(processed, "b_gate" if gated else "b_in")
    except AttributeError:
        b_in = None
    b_in = torch.zeros(w_in.shape[0], w_in.shape[2]) if b_in is None else b_in
    return {name: t.detach().double().cpu() for name, t in
            (("W_in", w_in), ("b_in", b_in), ("W_out", processed.W_out), ("W_U", processed.W_U),
                                                  ("W_Q", processed.W_Q))}


def hook_post(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def hook_pre(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_pre"


def default_keep(tokens: torch.Tensor) -> torch.Tensor:
    """The analysed positions when no exclusion is given: every position but 0 (BOS)."""
    keep = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    keep[:, 0] = False
    return keep


def release_attention(model, layer: int) -> None:
    """Let go of the attention pattern a bridge's layer keeps after its forward pass
    (TransformerLens 4 keeps each layer's last one, `_pattern`, for as long as the model
    lives): called as each layer ends, a forward pass holds one layer's pattern at a time
    instead of every layer's (1.5 GiB per GPT-2-medium sequence of 1024 tokens, per model,
    measured as 2.2x the no-cache feed's planned peak on 24-layer models)."""
    for module in model.blocks[layer].modules():
        if getattr(module, "_pattern", None) is not None:
            module._pattern = None


class _AllCaptured(Exception):
    """Raised by the last layer's hook: what follows it (the unembedding) is not needed."""


@torch.no_grad()
def mlp_activations(model, tokens: torch.Tensor, keep: torch.Tensor | None = None,
                    hook: str = "post") -> list[torch.Tensor]:
    """Per-layer MLP activations of a token batch (batch, ctx) at the kept positions (`keep`,
    a boolean (batch, ctx) mask, default every position but BOS at 0), as (kept positions,
    d_mlp) float32 tensors on the model's device, positions in row-major order. The forward
    pass stops at the last layer's hook, so its cost does not grow with the vocabulary."""
    return mlp_captures(model, tokens, keep, (hook,))[hook]


@torch.no_grad()
def mlp_captures(model, tokens: torch.Tensor, keep: torch.Tensor | None = None,
                 hooks: tuple[str, ...] = ("pre", "post")) -> dict[str, list[torch.Tensor]]:
    """mlp_activations for several hook points ("pre", "post") in one forward pass:
    {hook: per-layer activations}. The pass stops at the last layer's last of them."""
    n_layers = model.cfg.n_layers
    names = {"pre": hook_pre, "post": hook_post}
    last = "post" if "post" in hooks else "pre"  # hook_post runs after hook_pre in a block
    keep = (default_keep(tokens) if keep is None else keep).to(tokens.device)
    captured: dict[str, list[torch.Tensor | None]] = {h: [None] * n_layers for h in hooks}

    def keeper(kind: str, layer: int):
        # Bridge hook points may report an aliased name, so the layer comes from the closure.
        def keep_activations(act, hook):
            captured[kind][layer] = act[keep].float()
            if kind == last:
                release_attention(model, layer)
            if layer == n_layers - 1 and kind == last:
                raise _AllCaptured
            return act
        return keep_activations

    try:
        model.run_with_hooks(tokens, fwd_hooks=[(names[h](l), keeper(h, l)) for h in hooks for l in range(n_layers)],
                             return_type=None)
    except _AllCaptured:
        pass
    return captured


@torch.no_grad()
def mlp_rows(model, tokens: torch.Tensor, keep: torch.Tensor, layers: set[int]) -> torch.Tensor:
    """The no-cache feed's rows of one model: its `layers`' MLP activations at the kept
    positions, (kept positions, n_layers * d_mlp) float32 on the model's device, layer after
    layer as a cache holds them (zeros for the other layers). Each hook writes its layer
    straight into the rows, so a chunk is never held twice (as a list of layers, then their
    concatenation), and lets go of each layer's attention pattern (release_attention); the pass
    stops at the last layer in `layers`."""
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    keep = keep.to(tokens.device)
    make = torch.empty if len(layers) == n_layers else torch.zeros
    rows = make(int(keep.sum()), n_layers * d_mlp, device=tokens.device)
    last = max(layers)

    def writer(layer: int):
        def write_rows(act, hook):
            if layer in layers:
                rows[:, layer * d_mlp:(layer + 1) * d_mlp] = act[keep]
            release_attention(model, layer)
            if layer == last:
                raise _AllCaptured
            return act
        return write_rows

    try:
        model.run_with_hooks(tokens, fwd_hooks=[(hook_post(l), writer(l)) for l in range(last + 1)], return_type=None)
    except _AllCaptured:
        pass
    return rows
