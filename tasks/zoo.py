"""Tasks that build the toy zoo: its tokenizer, its training tokens, and each seed's model."""
from __future__ import annotations

import os
import shutil

import luigi
import torch

from tasks.common import PipelineTask, TaskProgress
from tasks.targets import store, warn_once
from unlib import zoo
from unlib.dataset import offline_corpus
from unlib.model_sets import ZOOS
from unlib.tokens import write_token_stream


class TrainedZooModel(luigi.LocalTarget):
    """A zoo model's folder, complete when every saved step's checkpoint matches its manifest;
    a damaged one is retrained from the last intact step before it."""

    def __init__(self, config: zoo.ZooConfig, model_dir):
        super().__init__(str(model_dir))
        self.config = config

    def exists(self) -> bool:
        damage = zoo.first_damage(self.config, self.path)
        if damage is not None and os.path.isdir(self.path) and zoo.saved_steps(self.path):
            step, why = damage
            earlier = [s for s in zoo.saved_steps(self.path) if s < step]
            warn_once(self.path, "retraining %s: %s; training resumes from %s", self.path, why,
                      f"step {earlier[-1]}" if earlier else "the start")
        return damage is None


class ZooTask(PipelineTask):
    zoo = luigi.Parameter(default="toy-zoo")

    @property
    def config(self) -> zoo.ZooConfig:
        return ZOOS[self.zoo]


class ZooTokenizer(ZooTask):
    """A byte-level BPE tokenizer trained on the offline corpus's training split."""

    def output(self):
        return luigi.LocalTarget(store().zoo_tokenizer_dir(self.config.zoo_id) / "tokenizer.json")

    def run(self):
        final = store().zoo_tokenizer_dir(self.config.zoo_id)
        tmp = final.with_name(f".tokenizer.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.set_status_message("training the tokenizer")
        zoo.train_tokenizer(offline_corpus("train")["text"], self.config.vocab_size,
                            self.config.tokenizer_train_chars, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


class ZooTrainingTokens(ZooTask):
    """The token stream the zoo trains on (training split of the offline corpus)."""

    def requires(self):
        return self.clone(ZooTokenizer)

    def output(self):
        return luigi.LocalTarget(store().zoo_training_tokens(self.config.zoo_id))

    def run(self):
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(store().zoo_tokenizer_dir(self.config.zoo_id)))
        self.set_status_message("tokenizing the training split")
        write_token_stream(self.output().path, offline_corpus("train")["text"], tokenizer,
                           tokenizer.bos_token_id, self.config.training_tokens, {"zoo": self.config.zoo_id})


class TrainToyModel(ZooTask):
    """One seed of the zoo, trained with checkpoints; resumes from its last saved step."""

    seed = luigi.IntParameter()

    def requires(self):
        return self.clone(ZooTrainingTokens)

    def output(self):
        return TrainedZooModel(self.config, store().zoo_model_dir(self.config.zoo_id, self.seed))

    def run(self):
        torch.manual_seed(self.seed)
        cfg = self.config
        with TaskProgress(self, f"train {self.zoo} seed {self.seed}", cfg.steps, "steps") as progress:
            zoo.train_model(cfg, self.seed, store().zoo_tokenizer_dir(cfg.zoo_id), self.input().path,
                            store().zoo_model_dir(cfg.zoo_id, self.seed),
                            progress=lambda step, loss: progress(step, extra=f", loss {loss:.3f}"))


def model_requirement(spec) -> list[luigi.Task]:
    """The task that produces a model's weights: training, for a toy-zoo model; none otherwise."""
    return [TrainToyModel(zoo=spec.zoo, seed=spec.seed)] if spec.zoo else []
