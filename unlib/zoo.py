"""The toy zoo: small GPT-2-architecture models trained here, with different seeds, on
the offline corpus, saved in Hugging Face format with one `checkpoint-<step>` folder per
saved step (optimizer state included, so training continues exactly from a saved step).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from unlib.h5read import read_h5
from unlib.store import file_fingerprint, short_hash

BOS_TOKEN = "<|endoftext|>"
TRAINING_STATE = "training_state.pt"
# Every file of a saved checkpoint by content, written with it, so damage is found and repaired.
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    """Architecture and training recipe of a toy zoo; its hash names the zoo's folder."""

    name: str
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_layers: int = 2
    d_model: int = 128
    d_mlp: int = 256
    n_heads: int = 4
    ctx_len: int = 64
    vocab_size: int = 257  # byte-level: 256 bytes + <|endoftext|>
    batch_size: int = 16
    steps: int = 1000
    save_steps: tuple[int, ...] = (0, 100, 250, 500, 1000)
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    tokenizer_train_chars: int = 4_000_000
    training_tokens: int = 2_000_000
    # CPU threads a seed trains on: the weights depend on it (a product split over threads sums
    # in another order), so it is part of the zoo's name, and a zoo trained otherwise is not reused
    training_threads: int = 1

    @property
    def zoo_id(self) -> str:
        return f"{self.name}-{short_hash(dataclasses.asdict(self))}"


def quiet_transformers() -> None:
    """Silence transformers' progress bars and advisory warnings, which would interleave
    with the pipeline's own progress display."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def train_tokenizer(texts, vocab_size: int, max_chars: int, out_dir: str | Path):
    """Train a byte-level BPE tokenizer (BOS/EOS `<|endoftext|>`, id 0) and save it in
    Hugging Face format. vocab_size 257 gives plain bytes (no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def limited():
        seen = 0
        for text in texts:
            yield text
            seen += len(text)
            if seen >= max_chars:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(limited(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN,
                                   unk_token=BOS_TOKEN, pad_token=BOS_TOKEN)
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(config: ZooConfig, seed: int, vocab_size: int):
    """A freshly initialised GPT-2 of the zoo's architecture (no dropout, so training is
    a deterministic function of the seed)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(hf_config(config, vocab_size))


def hf_config(config: ZooConfig, vocab_size: int):
    """The transformers config of the zoo's models."""
    from transformers import GPT2Config

    return GPT2Config(n_layer=config.n_layers, n_embd=config.d_model, n_inner=config.d_mlp, n_head=config.n_heads,
                      n_positions=config.ctx_len, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new")


def _lr_lambda(config: ZooConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def training_batch(stream: np.ndarray, config: ZooConfig, seed: int, step: int, bos_id: int) -> torch.Tensor:
    """The batch for `step`: a function of (seed, step) only, so a resumed run sees the
    same data as an uninterrupted one. Sequences start with BOS, as analysis sequences do."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - config.ctx_len, size=config.batch_size)
    body = np.stack([stream[s:s + config.ctx_len - 1] for s in starts])
    bos = np.full((config.batch_size, 1), bos_id, dtype=body.dtype)
    return torch.from_numpy(np.concatenate([bos, body], axis=1).astype(np.int64))


def saved_steps(model_dir: str | Path) -> list[int]:
    """Steps with a complete checkpoint folder, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        return []
    steps = []
    for p in model_dir.glob("checkpoint-*"):
        if p.name.split("-", 1)[1].isdigit() and (p / TRAINING_STATE).exists():
            steps.append(int(p.name.split("-", 1)[1]))
    return sorted(steps)


def _save_checkpoint(model, optimizer, scheduler, tokenizer_dir: Path, model_dir: Path, step: int) -> None:
    final = model_dir / f"checkpoint-{step}"
    tmp = model_dir / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy2(f, tmp / f.name)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               tmp / TRAINING_STATE)
    (tmp / MANIFEST).write_text(json.dumps({p.name: file_fingerprint(p) for p in sorted(tmp.iterdir())}, indent=1))
    os.replace(tmp, final)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a saved zoo checkpoint cannot be used (a file missing or changed since it was saved),
    or None when every file matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{folder.name} has no readable {MANIFEST} (an interrupted or older run saved it)"
    for name, fingerprint in manifest.items():
        if not (folder / name).is_file():
            return f"{folder.name}/{name} is missing"
        if file_fingerprint(folder / name) != fingerprint:
            return f"{folder.name}/{name} changed since it was saved"
    return None


def first_damage(config: ZooConfig, model_dir: str | Path) -> tuple[int, str] | None:
    """(step, why) of the earliest saved step whose checkpoint is missing or damaged, or None."""
    for step in sorted(config.save_steps):
        problem = checkpoint_problem(Path(model_dir) / f"checkpoint-{step}")
        if problem is not None:
            return step, problem
    return None


def discard_from(model_dir: str | Path, step: int) -> None:
    """Remove the checkpoints at `step` and later, so training resumes from the one before."""
    for later in saved_steps(model_dir):
        if later >= step:
            shutil.rmtree(Path(model_dir) / f"checkpoint-{later}")


def train_model(config: ZooConfig, seed: int, tokenizer_dir: str | Path, tokens_file: str | Path,
                model_dir: str | Path, progress: Callable[[int, float], None] | None = None) -> float:
    """Train one zoo model, saving `checkpoint-<step>` folders; resume from the last saved
    step if there is one. Returns the final training loss. Trains on config.training_threads
    CPU threads (one): the weights then do not depend on the core count or WORKERS, and
    several seeds train at once with WORKERS > 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.training_threads)
    try:
        return _train(config, seed, tokenizer_dir, tokens_file, model_dir, progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: ZooConfig, seed: int, tokenizer_dir: str | Path, tokens_file: str | Path,
           model_dir: str | Path, progress: Callable[[int, float], None] | None) -> float:
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    quiet_transformers()
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    stream = read_h5(tokens_file)[0]["tokens"]
    bos_id = tokenizer.bos_token_id
    damage = first_damage(config, model_dir)
    if damage is not None:
        discard_from(model_dir, damage[0])
    done = saved_steps(model_dir)
    if done:
        start = done[-1]
        model = GPT2LMHeadModel.from_pretrained(str(model_dir / f"checkpoint-{start}"))
    else:
        start = 0
        model = build_model(config, seed, len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    if done:
        state = torch.load(model_dir / f"checkpoint-{start}" / TRAINING_STATE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    elif 0 in config.save_steps:
        _save_checkpoint(model, optimizer, scheduler, Path(tokenizer_dir), model_dir, 0)
    model.train()
    loss_value = float("nan")
    for step in range(start, config.steps):
        batch = training_batch(stream, config, seed, step, bos_id)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        if step + 1 in config.save_steps:
            _save_checkpoint(model, optimizer, scheduler, Path(tokenizer_dir), model_dir, step + 1)
        if progress is not None:
            progress(step + 1, loss_value)
    return loss_value
