"""Model sets, checkpoints, offline loading errors, and exact resumption of zoo training."""
import shutil

import numpy as np
import pytest
import torch

from unlib import zoo
from unlib.checkpoints import available_checkpoints, check_checkpoint, model_location
from unlib.dataset import offline_corpus
from unlib.model_loading import load_model, mlp_shape
from unlib.model_sets import ModelError, ModelSpec, resolve_model_set
from unlib.tokens import write_token_stream


def test_stanford_sets_expand_to_five_seeds_with_checkpoint_revisions():
    small = resolve_model_set("stanford-gpt2-small")
    assert [m.name for m in small.models][0] == "stanford-crfm/alias-gpt2-small-x21" and len(small.models) == 5
    medium = resolve_model_set("stanford-gpt2-medium")
    assert medium.models[4].name == "stanford-crfm/eowyn-gpt2-medium-x777"
    assert model_location(small.models[1], 20000) == ("stanford-crfm/battlestar-gpt2-small-x49", "checkpoint-20000")
    steps = available_checkpoints(small.models[0])
    assert len(steps) == 10 + 38 + 180 + 381 and steps[-1] == 400000
    check_checkpoint(small.models[0], 1950)
    with pytest.raises(ModelError, match="nearest: 19900 or 20000"):
        check_checkpoint(small.models[0], 19950)


def test_pythia_set_is_the_four_160m_seeds_with_step_revisions():
    pythia = resolve_model_set("pythia-160m")
    assert [m.name for m in pythia.models] == ["EleutherAI/pythia-160m"] + [f"EleutherAI/pythia-160m-seed{s}"
                                                                             for s in (1, 2, 3)]
    steps = available_checkpoints(pythia.models[2])
    assert steps[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000] and steps[-1] == 143000
    assert len(steps) == 11 + 143
    assert model_location(pythia.models[2], 512) == ("EleutherAI/pythia-160m-seed2", "step512")
    assert model_location(pythia.models[0], None) == ("EleutherAI/pythia-160m", None)
    with pytest.raises(ModelError, match="no checkpoint at step 700; nearest: 512 or 1000"):
        check_checkpoint(pythia.models[0], 700)
    with pytest.raises(ModelError, match="hf download EleutherAI/pythia-160m-seed3 --revision step4000"):
        mlp_shape(pythia.models[3], 4000)
    # a hub model outside the checkpointed families has no schedule: CHECKPOINT is refused
    with pytest.raises(ModelError, match="has no training checkpoints"):
        check_checkpoint(ModelSpec("gpt2", "gpt2"), 1000)


def test_unreachable_hub_model_is_a_clear_error():
    spec = resolve_model_set("stanford-gpt2-small").models[0]
    with pytest.raises(ModelError, match="not in the local Hugging Face cache.*hf download"):
        mlp_shape(spec, 1000)
    with pytest.raises(ModelError, match="at checkpoint-1000"):
        load_model(spec, 1000)


def test_unknown_set_and_missing_folder():
    with pytest.raises(ModelError, match="unknown model set"):
        resolve_model_set("gpt-17")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_set("./nowhere/a,./nowhere/b")


def test_zoo_training_resumes_exactly(tmp_path):
    cfg = zoo.ZooConfig(name="resume-test", seeds=(0,), d_model=16, d_mlp=32, n_heads=2, ctx_len=16,
                        vocab_size=257, batch_size=4, steps=40, save_steps=(0, 20, 40), training_tokens=20000)
    texts = offline_corpus("train")["text"][:40]
    tok = zoo.train_tokenizer(texts, cfg.vocab_size, 10**6, tmp_path / "tok")
    write_token_stream(tmp_path / "tokens.h5", texts, tok, tok.bos_token_id, cfg.training_tokens, {})
    zoo.train_model(cfg, 0, tmp_path / "tok", tmp_path / "tokens.h5", tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-40")  # as if killed between step 20 and 40
    assert zoo.saved_steps(tmp_path / "resumed") == [0, 20]
    zoo.train_model(cfg, 0, tmp_path / "tok", tmp_path / "tokens.h5", tmp_path / "resumed")
    from transformers import GPT2LMHeadModel
    a = GPT2LMHeadModel.from_pretrained(str(tmp_path / "straight" / "checkpoint-40")).state_dict()
    b = GPT2LMHeadModel.from_pretrained(str(tmp_path / "resumed" / "checkpoint-40")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = GPT2LMHeadModel.from_pretrained(str(tmp_path / "straight" / "checkpoint-0")).state_dict()
    assert not all(torch.equal(a[k], first[k]) for k in a)


def test_offline_corpus_splits_are_disjoint():
    train, held = offline_corpus("train"), offline_corpus("heldout")
    assert set(train["source"]).isdisjoint(held["source"])
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.2
    assert np.mean([len(t) for t in held["text"]]) > 1000
