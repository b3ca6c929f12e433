"""Tiny random causal LMs with random LoRA adapters, built offline from configs."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from tuco_peft.families import registered_model_types

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)


def family_config(family: str, **overrides):
    """A 3-block config per family, with the family's quirks switched on (GQA, sliding windows, softcaps);
    ``overrides`` replace config fields (e.g. ``intermediate_size``)."""
    config = _family_config(family)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def _family_config(family: str):
    if family == "llama":
        return LlamaConfig(**_COMMON, num_key_value_heads=2, attention_bias=True)
    if family == "mistral":
        return MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=4)
    if family == "qwen2":
        return Qwen2Config(
            **_COMMON, num_key_value_heads=2, use_sliding_window=True, sliding_window=5, max_window_layers=1
        )
    if family == "qwen3":
        return Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=24)
    if family == "gemma":
        return GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=16)
    if family == "gemma2":
        return Gemma2Config(
            **_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
        )
    if family == "gemma3_text":  # local layers (window 4, their own rotary base), then a global one
        return Gemma3TextConfig(
            **_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2,
        )
    if family == "phi3":
        return Phi3Config(
            **_COMMON, num_key_value_heads=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
            partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2,
        )
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64)
    if family == "gpt_neox":  # parallel residual, partial rotary (a quarter of each head)
        return GPTNeoXConfig(**_COMMON, bos_token_id=1, eos_token_id=2)
    if family == "olmo2":
        return Olmo2Config(**_COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise KeyError(family)


FAMILIES = registered_model_types()  # every registered family is covered by every family test


def base_model(family: str, seed: int = 0, dtype=torch.float32, attention: str | None = "eager", **overrides):
    """A random model of ``family``; ``attention`` None is what ``from_config`` picks by itself (sdpa), as users get."""
    torch.manual_seed(seed)
    config = family_config(family, **overrides)
    chosen = {} if attention is None else {"attn_implementation": attention}
    model = AutoModelForCausalLM.from_config(config, **chosen).to(dtype)
    return model.eval()


def lora_model(base, *, seed: int = 1, **lora_kwargs):
    """Wrap ``base`` with a random (non-zero) LoRA adapter on every linear layer."""
    torch.manual_seed(seed)
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    kwargs.update(lora_kwargs)
    return get_peft_model(base, LoraConfig(**kwargs)).eval()


def model_pair(family: str, attention: str | None = "eager", **lora_kwargs):
    """(pre-trained model, LoRA fine-tune of a copy of it): the paper's two-model setting."""
    base = base_model(family, attention=attention)
    pretrained = copy.deepcopy(base)
    return pretrained, lora_model(base, **lora_kwargs)


def full_finetune_pair(family: str, attention: str | None = "eager"):
    """(pre-trained model, a copy of it with every weight perturbed): a full fine-tune, no adapter."""
    pretrained = base_model(family, attention=attention)
    finetuned = copy.deepcopy(pretrained)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in finetuned.parameters():
            param.add_(0.05 * param.std() * torch.randn(param.shape, generator=generator))
    return pretrained, finetuned


def padded_batch(seed: int = 2, lengths=(9, 6, 12), side: str = "left"):
    """Random prompts of different lengths, padded to one tensor with token id 0."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = torch.randint(1, VOCAB, (n,), generator=generator)
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, span], mask[row, span] = tokens, 1
    return ids, mask
