"""Build the demo pair deterministically: a tokenizer, a small pre-trained base LM, a LoRA chat fine-tune.

Everything is made from ``corpus`` with fixed seeds on the CPU and cached, so ``tuco-peft demo`` needs no
network. The full recipe takes about a minute on two CPU cores; ``TUCO_PEFT_DEMO_SCALE`` (a float) scales
the number of training steps down for tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import corpus

if TYPE_CHECKING:
    from peft import PeftModel

CACHE_ENV = "TUCO_PEFT_DEMO_DIR"
SCALE_ENV = "TUCO_PEFT_DEMO_SCALE"
_RECIPE_VERSION = 6  # bump when corpus or training code changes: it is part of the cache key
# Where along the fine-tune its adapter is saved, as a Trainer's checkpoint-N folders: dense early, where
# most of what the fine-tune teaches is learnt.
CHECKPOINT_FRACTIONS = (1 / 100, 1 / 32, 1 / 8, 1 / 2, 1)


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes and schedule of the demo pair. Every field enters the cache key."""

    vocab_size: int = 768
    hidden_size: int = 64
    intermediate_size: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 64
    batch_size: int = 16
    pretrain_steps: int = 400
    finetune_steps: int = 300
    lora_rank: int = 8
    seed: int = 0

    def scaled(self, factor: float) -> DemoRecipe:
        """The same recipe with ``factor`` times the training steps (at least one of each)."""
        return dataclasses.replace(
            self,
            pretrain_steps=max(1, round(self.pretrain_steps * factor)),
            finetune_steps=max(1, round(self.finetune_steps * factor)),
        )

    def key(self) -> str:
        fields = json.dumps({"version": _RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(fields.encode()).hexdigest()[:12]


def default_recipe() -> DemoRecipe:
    scale = os.environ.get(SCALE_ENV)
    return DemoRecipe() if not scale else DemoRecipe().scaled(float(scale))


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tuco-peft" / "demo")


def _web_documents(rng: random.Random, n: int) -> list[str]:
    return [corpus.web_text(rng, rng.randint(2, 6)) for _ in range(n)]


def _chat_documents(rng: random.Random, n: int) -> list[str]:
    return [corpus.chat_exchange(rng) for _ in range(n)]


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, with the chat markers added as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(corpus.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=corpus.END_OF_TEXT,
        pad_token=corpus.END_OF_TEXT,
        additional_special_tokens=list(corpus.SPECIAL_TOKENS[1:]),
        chat_template=corpus.CHAT_TEMPLATE,
        padding_side="left",
    )


def _token_stream(tokenizer, documents: list[str], separators: list[str]) -> torch.Tensor:
    text = "".join(document + separator for document, separator in zip(documents, separators))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _train(
    model: torch.nn.Module,
    stream: torch.Tensor,
    recipe: DemoRecipe,
    steps: int,
    lr: float,
    seed: int,
    after_step: Callable[[int, float], None] | None = None,
) -> None:
    """Next-token training on random windows of ``stream``, with a seeded sampler; ``after_step`` is given each
    step's number (from 1) and loss."""
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
    model.train()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(stream) - recipe.seq_len, (recipe.batch_size,), generator=generator)
        windows = torch.stack([stream[s : s + recipe.seq_len] for s in starts.tolist()])
        loss = model(input_ids=windows, labels=windows).loss  # labels are shifted inside the model
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step, loss.item())
    model.eval()


def _checkpoint_saver(model: PeftModel, run: Path, steps: int) -> Callable[[int, float], None]:
    """An ``after_step`` that saves the adapter at ``CHECKPOINT_FRACTIONS`` of ``steps`` as a Trainer does:
    ``run/checkpoint-N`` with a trainer_state.json of the step and the losses logged so far."""
    saved_at = {max(1, round(steps * fraction)) for fraction in CHECKPOINT_FRACTIONS}
    history: list[dict[str, float]] = []

    def after_step(step: int, loss: float) -> None:
        history.append({"step": step, "loss": round(loss, 4)})
        if step in saved_at:
            folder = run / f"checkpoint-{step}"
            model.save_pretrained(str(folder))
            state = {"global_step": step, "max_steps": steps, "log_history": history}
            (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))

    return after_step


def _build(recipe: DemoRecipe, target: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(recipe.seed)
    web = _web_documents(rng, 4000)
    chats = _chat_documents(rng, 3000)
    tokenizer = build_tokenizer(web + [corpus.without_markers(chat) for chat in chats], recipe.vocab_size)

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads,
        num_key_value_heads=recipe.n_heads,
        max_position_embeddings=4 * recipe.seq_len,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config)
    # Pre-training documents end with a random special token, so that every special token gets a trained
    # embedding; what the markers mean in a chat is left for the fine-tune to teach.
    separators = [rng.choice(corpus.SPECIAL_TOKENS) for _ in web]
    _train(
        base, _token_stream(tokenizer, web, separators), recipe, recipe.pretrain_steps, lr=3e-3, seed=recipe.seed + 1
    )
    base.save_pretrained(target / "base")
    tokenizer.save_pretrained(target / "base")

    lora = LoraConfig(
        r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank, target_modules="all-linear", lora_dropout=0.0
    )
    model = get_peft_model(base, lora)
    chat_stream = _token_stream(tokenizer, chats, [corpus.END_OF_TEXT] * len(chats))
    saver = _checkpoint_saver(model, target / "run", recipe.finetune_steps)
    _train(model, chat_stream, recipe, recipe.finetune_steps, lr=5e-3, seed=recipe.seed + 2, after_step=saver)
    model.save_pretrained(str(target / "adapter"))


def _pair_dir(cache_dir: str | os.PathLike | None, recipe: DemoRecipe | None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / (recipe or default_recipe()).key()


def is_built(cache_dir: str | os.PathLike | None = None, recipe: DemoRecipe | None = None) -> bool:
    """Whether ``ensure_demo_checkpoints`` would reuse a cached pair rather than build one."""
    return (_pair_dir(cache_dir, recipe) / "adapter" / "adapter_model.safetensors").is_file()


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: for a model this small, more threads mostly contend (badly on busy machines)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def ensure_demo_checkpoints(
    cache_dir: str | os.PathLike | None = None, recipe: DemoRecipe | None = None
) -> tuple[Path, Path]:
    """Paths of the demo base model (with its tokenizer) and of its LoRA adapter, built on first use.

    The pair is cached under ``cache_dir`` (default ``$TUCO_PEFT_DEMO_DIR`` or ``~/.cache/tuco-peft/demo``),
    one folder per recipe. A build goes to a temporary folder that is renamed when complete, so an
    interrupted build never leaves a half-written pair behind.
    """
    recipe = recipe or default_recipe()
    final = _pair_dir(cache_dir, recipe)
    root = final.parent
    if not is_built(cache_dir, recipe):
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
        try:
            with torch.random.fork_rng(devices=[]), single_thread():
                _build(recipe, staging)
            try:
                staging.rename(final)
            except OSError:
                if not (final / "adapter").is_dir():  # not a concurrent build that finished first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final / "base", final / "adapter"


def ensure_demo_run(cache_dir: str | os.PathLike | None = None, recipe: DemoRecipe | None = None) -> Path:
    """The demo fine-tune's run folder (its adapter at ``CHECKPOINT_FRACTIONS`` of its steps, as ``checkpoint-N``
    folders with their trainer_state.json), built with the demo pair on first use."""
    base, _ = ensure_demo_checkpoints(cache_dir, recipe)
    return base.parent / "run"
