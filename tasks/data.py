"""Tokenized analysis data."""
from __future__ import annotations

import luigi

from tasks.common import PipelineTask
from tasks.params import RunParams, TokenParams
from tasks.targets import H5Target, made_from, store
from tasks.zoo import ZooTokenizer
from unlib.dataset import DOCUMENT_SEED, load_texts, parse_dataset
from unlib.exclusion import exclusion_ids
from unlib.model_loading import load_tokenizer
from unlib.model_sets import ZOOS
from unlib.store import h5_attrs
from unlib.tokens import HELD_OUT_RULE, write_token_sequences


def dataset_id(dataset: str) -> str:
    """Store name of a dataset: the offline corpus's split, a hub name with config and split, or local files."""
    return parse_dataset(dataset).dataset_id


class TokenizeDataset(TokenParams, PipelineTask):
    """n_tokens analysed positions of the dataset (documents in a seeded random order), as
    BOS-led sequences of ctx_len tokens with a mask of the positions kept (not BOS, not an
    excluded token). With skip_tokens, the ablation's held-out tokens: from the documents after
    those the file of that many tokens draws on, each cut short (HELD_OUT_RULE)."""

    skip_tokens = luigi.IntParameter(default=0, description="kept positions of the file these tokens follow")

    def tokenizer_id(self) -> str:
        ms = self.model_set
        return ZOOS[ms.zoo].zoo_id if ms.zoo else ms.models[0].model_id

    def requires(self):
        if self.model_set.zoo:
            return ZooTokenizer(zoo=self.model_set.zoo)
        return []

    def token_attrs(self) -> dict:
        """What the token file is made from: recorded in it and checked before it is reused."""
        return {"dataset": dataset_id(self.dataset), "tokenizer": self.tokenizer_id(), "n_tokens": self.n_tokens,
                "ctx_len": self.ctx_len, "exclude_tokens": self.exclude_tokens, "document_seed": DOCUMENT_SEED,
                "inputs": self.token_inputs(),
                # only held-out files record it, so analysis token files written before it stay valid
                **({"skip_tokens": self.skip_tokens, "held_out": HELD_OUT_RULE} if self.skip_tokens else {})}

    def output(self):
        return H5Target(store().tokens(dataset_id(self.dataset), self.tokenizer_id(), self.n_tokens, self.ctx_len,
                                       self.exclude_tokens, DOCUMENT_SEED, self.skip_tokens),
                        self.token_attrs())

    def run(self):
        inputs = made_from(self)
        tokenizer = load_tokenizer(self.model_set, store().root)
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.set_status_message(f"tokenizing {self.dataset}")
        write_token_sequences(self.output().path, load_texts(self.dataset), tokenizer, bos,
                              self.n_tokens, self.ctx_len, exclusion_ids(self.exclude_tokens, tokenizer),
                              {**h5_attrs(self.token_attrs()), "made_from": inputs}, self.skip_tokens)


def held_out_tokens(task: RunParams) -> TokenizeDataset:
    """The ablation's held-out tokens of a run: ABLATION_TOKENS from the documents after the
    analysed ones."""
    return task.clone(TokenizeDataset, n_tokens=task.ablation_n_tokens, skip_tokens=task.n_tokens)
