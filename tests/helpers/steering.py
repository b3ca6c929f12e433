"""What the steering and generation tests share: a plain forward and Hugging Face's greedy generation, the
prefixes a generation chose its tokens from, and a snapshot of what steering must leave as it found it."""

import torch

N_NEW = 6  # tokens each generation test adds


def plain_logits(model, ids, mask):
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits


def real_rows(logits, mask):
    return logits[mask.bool()]


def greedy_generate(model, ids, mask, n_new, **kwargs):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
            pad_token_id=0, **kwargs,
        )


def model_snapshot(model):
    modules = list(model.modules())
    return {
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules],
        "forward": ["forward" in m.__dict__ for m in modules],
        "flags": [m.__dict__.get("_disable_adapters") for m in modules],
        "training": [m.training for m in modules],
        "grad": [p.requires_grad for p in model.parameters()],
    }


def prefixes(sequences, mask):
    """(ids, mask) of every prefix that chose a new token: prompt, prompt + 1 new token, ..."""
    width = mask.shape[1]
    for k in range(sequences.shape[1] - width):
        extended = torch.cat([mask, mask.new_ones(mask.shape[0], k)], dim=1)
        yield sequences[:, : width + k], extended
