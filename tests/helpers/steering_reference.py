"""FTC_α (Nuti et al., Def. 5.1) written plainly: two models, every block run twice, no cache.

At block l the fine-tuned block and the pre-trained model's block both see the steered state x_l, and
x_{l+1} = f_PT(x_l) + α_l·(f_FT(x_l) − f_PT(x_l)). Greedy decoding re-runs the whole prefix at every step.
Nothing here is shared with tuco_peft.
"""

from __future__ import annotations

import torch

from helpers.oracle import decoder_blocks


def _run_steered(ft_model, pt_model, input_ids, attention_mask, alphas, on_block=None):
    """Logits of the steered model; ``on_block(l, x_l, f_PT output, f_FT output)`` sees every block."""
    pt_blocks = decoder_blocks(pt_model)
    pretrained_keys_values: dict = {}  # what pre-trained blocks store for later ones to reuse (Gemma 4)

    def make_hook(index):
        def mix(module, args, kwargs, output):
            ft_out = output[0] if isinstance(output, tuple) else output
            if "shared_kv_states" in kwargs:
                kwargs = {**kwargs, "shared_kv_states": pretrained_keys_values}
            pt_out = pt_blocks[index](*args, **kwargs)
            pt_out = pt_out[0] if isinstance(pt_out, tuple) else pt_out
            if on_block is not None:
                on_block(index, args[0] if args else kwargs["hidden_states"], pt_out, ft_out)
            mixed = pt_out + alphas[index] * (ft_out - pt_out)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed  # as the block returns it

        return mix

    blocks = decoder_blocks(ft_model)
    handles = [block.register_forward_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.no_grad():
            return ft_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).logits
    finally:
        for handle in handles:
            handle.remove()


def steered_logits(ft_model, pt_model, input_ids, attention_mask, alphas):
    """Logits [batch, seq, vocab] of the α-steered fine-tuned model, without a cache."""
    return _run_steered(ft_model, pt_model, input_ids, attention_mask, alphas)


def step_logits(ft_model, pt_model, sequences, prompt_mask, alphas):
    """Logits [batch, new tokens, vocab] before each token a generation appended to its prompts (teacher-forced)."""
    width = prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], sequences.shape[1] - width)], dim=1)
    with torch.no_grad():
        return steered_logits(ft_model, pt_model, sequences, mask, alphas)[:, width - 1 : -1]


def assert_greedy_choices(model, sequences, reference, width):
    """Each new token is a largest logit of the reference (to 1e-5: tiny random models have near ties), end of
    sequence excepted (``min_new_tokens`` forbids it)."""
    end = torch.tensor(model.generation_config.eos_token_id or [], dtype=torch.long).flatten()
    reference = reference.index_fill(-1, end[end < reference.shape[-1]], float("-inf"))
    chosen = reference.gather(-1, sequences[:, width:, None])[..., 0]
    assert (reference.amax(-1) - chosen).max() <= 1e-5


def greedy(ft_model, pt_model, input_ids, attention_mask, alphas, n_new):
    """Greedy continuation of a left-padded batch, re-running the full prefix for every new token."""
    ids, mask = input_ids, attention_mask
    for _ in range(n_new):
        next_token = steered_logits(ft_model, pt_model, ids, mask, alphas)[:, -1].argmax(-1)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def steered_last_token_tuco(ft_model, pt_model, input_ids, attention_mask, alphas):
    """TuCo at the last column of the steered stream: ‖Σ α_l·FTC_l‖₁ / (‖Σ PTC_l‖₁ + ‖Σ α_l·FTC_l‖₁)."""
    sums = {"ptc": 0.0, "ftc": 0.0}

    def accumulate(index, x, pt_out, ft_out):
        sums["ptc"] = sums["ptc"] + (pt_out - x)[:, -1].double()
        sums["ftc"] = sums["ftc"] + alphas[index] * (ft_out - pt_out)[:, -1].double()

    _run_steered(ft_model, pt_model, input_ids, attention_mask, alphas, accumulate)
    ftc_norm = sums["ftc"].abs().sum(-1)
    return (ftc_norm / (sums["ptc"].abs().sum(-1) + ftc_norm)).float()
