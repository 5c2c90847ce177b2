"""The notebook API: excess correlations of loaded or named models computed in memory,
without the task graph or an activation cache, by the same engine as the pipeline."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import pandas as pd
import torch

from unlib import UserError
from unlib.engine.comoments import Feed
from unlib.engine.engine import ExcessCorrelationEngine
from unlib.engine.halves import BLOCKS, HalfSplit
from unlib.engine.precision import default_precision
from unlib.engine.results import LayerResult, PassStats
from unlib.engine.tables import excess_tables


def run_engine(chunks: Feed, layer_sizes: list[list[int]], reference: int = 0, n_rotations: int = 5,
               rotation_seed: int = 0, device: str = "cpu", memory_budget: int | None = None,
               progress: Callable[[PassStats], None] | None = None, split: HalfSplit = BLOCKS,
               precision: str | None = None) -> list[LayerResult]:
    """Results of one reference model; `chunks(needed)` yields a fresh stream per pass;
    `split`: the halves (default alternating blocks of rows; unlib.tokens.document_halves for
    halves of whole documents, as the pipeline makes them); `precision`: the products'
    (unlib.engine.precision; None: the device's default, as the pipeline's)."""
    engine = ExcessCorrelationEngine(layer_sizes, [reference], n_rotations, rotation_seed, device, memory_budget,
                                     precision=precision or default_precision(device))
    return engine.run(chunks, progress, split)[reference]


class MemoryEfficientExcessCorrelationComputer:
    """Excess correlations of a reference model's neurons against the other models, computed
    without an activation cache: every model runs on the same token batch and the
    activations (float32, as a cache holds them) feed the engine.

    model_names: a model set name (`toy-zoo-mini`, `stanford-gpt2-small`; a toy zoo must be
    trained in the store already), a list of Hugging Face names and local model folders (or
    one comma-separated string), loaded at `checkpoint` (None: final weights) onto `device`
    ("auto": cuda when available); or models already loaded as TransformerBridges, named by
    `labels` (default model_0, model_1, ...) and left on their own device under "auto"."""

    def __init__(self, model_names, device: str | torch.device = "auto", checkpoint: int | None = None,
                 labels: list[str] | None = None, store_dir: str | None = None):
        from unlib.checkpoints import check_checkpoint, model_location
        from unlib.model_loading import check_same_tokenizer, load_model, resolve_device
        from unlib.model_sets import ModelError, resolve_model_set

        self.store_dir = store_dir
        self.model_set = None
        if isinstance(model_names, (str, os.PathLike)) or all(isinstance(m, (str, os.PathLike)) for m in model_names):
            models = os.fspath(model_names) if isinstance(model_names, (str, os.PathLike)) \
                else ",".join(map(os.fspath, model_names))
            self.model_set = resolve_model_set(models, store_dir)
            self.device = resolve_device(str(device))
            for spec in self.model_set.models:
                check_checkpoint(spec, checkpoint)
                if spec.zoo and not os.path.isdir(model_location(spec, checkpoint)[0]):
                    raise ModelError(f"model {spec.name} is not trained in the store ({spec.source}): run the "
                                     f"analysis of {spec.zoo} once (make analyze MODELS={spec.zoo}, or "
                                     f"run_universal_neurons_analysis) to train it")
            if self.model_set.zoo is None:
                check_same_tokenizer(self.model_set.models)
            self.models = [load_model(spec, checkpoint, self.device) for spec in self.model_set.models]
            self.model_names = labels or [spec.name for spec in self.model_set.models]
        else:
            self.models = list(model_names)
            if any(isinstance(m, (str, os.PathLike)) for m in self.models):
                raise ModelError("give model names and folders, or loaded models, not both")
            self.device = next(self.models[0].parameters()).device if str(device) == "auto" else device
            self.model_names = labels or [f"model_{i}" for i in range(len(self.models))]

    def tokenizer(self):
        """The models' tokenizer: the set's (a toy zoo's own, else the first model's), or
        the first loaded model's."""
        from unlib.model_loading import load_tokenizer

        if self.model_set is not None:
            return load_tokenizer(self.model_set, self.store_dir)
        tokenizer = getattr(self.models[0], "tokenizer", None)
        if tokenizer is None:
            raise UserError("the first model has no tokenizer to read a dataset with: give token ids instead")
        return tokenizer

    def tokens(self, dataset_path, keep=None, n_tokens: int | None = None, ctx_len: int | None = None,
               exclude_tokens: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids (sequences, ctx_len), boolean mask of the analysed positions).

        dataset_path: a DATASET value (local .txt/.jsonl/.json/.parquet/.npy files, a Hugging
        Face dataset `name[:config][@split]`, python-stdlib), tokenized exactly as the
        pipeline does: n_tokens analysed positions (default 100000) in BOS-led sequences of
        ctx_len tokens, the positions of exclude_tokens dropped (EXCLUDE_TOKENS syntax);
        ctx_len and exclude_tokens default to the model set's (for loaded models or a list
        of models: 512 capped at the models' context, and bos,eos,pad,newline).
        Or token ids (n_sequences, ctx_len), BOS in column 0, with `keep` (default: every
        position but column 0)."""
        from unlib.dataset import check_dataset, load_texts
        from unlib.exclusion import exclusion_ids, kept_positions
        from unlib.tokens import DEFAULT_N_TOKENS, token_sequences
        from unlib.model_sets import PAPER_DEFAULTS

        if not isinstance(dataset_path, (str, os.PathLike)):
            tokens = np.asarray(dataset_path.cpu() if isinstance(dataset_path, torch.Tensor) else dataset_path)
            return tokens, kept_positions(tokens, []) if keep is None else np.asarray(keep, dtype=bool)
        if keep is not None:
            raise UserError("keep applies to token ids; for a dataset, choose the positions with exclude_tokens")
        dataset = os.fspath(dataset_path)
        check_dataset(dataset)
        defaults = PAPER_DEFAULTS if self.model_set is None else self.model_set.defaults
        if ctx_len is None:
            ctx_len = min([defaults.ctx_len] + [m.cfg.n_ctx for m in self.models if getattr(m.cfg, "n_ctx", None)])
        tokenizer = self.tokenizer()
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        exclude = exclusion_ids(defaults.exclude_tokens if exclude_tokens is None else exclude_tokens, tokenizer)
        tokens, keep, _ = token_sequences(load_texts(dataset), tokenizer, bos, n_tokens or DEFAULT_N_TOKENS, ctx_len,
                                          exclude)
        return tokens, keep

    def compute_results(self, dataset_path, reference: int = 0, n_rotations: int = 5, rotation_seed: int = 0,
                        batch_size: int = 32, keep=None, n_tokens: int | None = None, ctx_len: int | None = None,
                        exclude_tokens: str | None = None, precision: str | None = None) -> list[LayerResult]:
        """The engine's per-layer results for the reference model (see tokens()), with halves
        of whole documents (the BOS of column 0 also ends a document) and the products'
        precision (None: the device's default), as the pipeline's."""
        from unlib.activations import model_chunks
        from unlib.tokens import document_halves

        tokens, keep = self.tokens(dataset_path, keep, n_tokens, ctx_len, exclude_tokens)
        sizes = [[m.cfg.d_mlp] * m.cfg.n_layers for m in self.models]
        split = document_halves(tokens, keep)
        return run_engine(lambda needed: model_chunks(self.models, tokens, keep, batch_size, self.device, needed), sizes,
                          reference, n_rotations, rotation_seed, self.device, split=split, precision=precision)

    def compute_excess_correlations_for_all_neurons(self, dataset_path, reference: int = 0, n_rotations: int = 5,
                                                    rotation_seed: int = 0, batch_size: int = 32, keep=None,
                                                    n_tokens: int | None = None, ctx_len: int | None = None,
                                                    exclude_tokens: str | None = None,
                                                    precision: str | None = None) -> pd.DataFrame:
        """The excess-correlation table of the reference model (the columns of
        excess_correlation_scores.csv) over `dataset_path`: a dataset path or name, or token
        ids (see tokens())."""
        results = self.compute_results(dataset_path, reference, n_rotations, rotation_seed, batch_size, keep,
                                       n_tokens, ctx_len, exclude_tokens, precision)
        return excess_tables(results, self.model_names)[0]
