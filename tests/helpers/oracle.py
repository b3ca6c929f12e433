"""The paper's Algorithm 1, written plainly: two models, two passes.

Pass 1 runs the fine-tuned model and records each block's inputs and output. Pass 2 runs each block of
the pre-trained model on the recorded fine-tuned inputs. PTC_l = f_PT(x_l), FTC_l = f_FT(x_l) − PTC_l.
Nothing here is shared with tuco_peft.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def decoder_blocks(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    stack = getattr(inner, inner.base_model_prefix)  # .model, .transformer, .gpt_neox, ...
    stack = getattr(stack, "decoder", stack)  # OPT keeps its blocks one level down
    stack = getattr(stack, "language_model", stack)  # a multimodal model's text decoder (Gemma 3, Gemma 4)
    return stack.h if hasattr(stack, "h") else stack.layers


def two_pass(ft_model, pt_blocks, input_ids, attention_mask, pt_context=nullcontext, pt_reads_ft_keys_values=False):
    """Per-layer PTC/FTC at every position, [batch, n_layers, seq, d] float32, plus x0 and xL [batch, seq, d].

    Where blocks reuse earlier blocks' keys/values (Gemma 4), the pre-trained blocks store and read their own;
    ``pt_reads_ft_keys_values``: they read the fine-tuned blocks' instead (a wrong choice, for contrast)."""
    records = []

    def before(module, args, kwargs):
        records.append({"args": args, "kwargs": kwargs})

    def after(module, args, kwargs, output):
        records[-1]["out"] = output[0] if isinstance(output, tuple) else output

    blocks = decoder_blocks(ft_model)
    handles = [b.register_forward_pre_hook(before, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(after, with_kwargs=True) for b in blocks]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    try:
        ft_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    ptc, ftc = [], []
    pretrained_keys_values: dict = {}
    with pt_context():
        for block, record in zip(pt_blocks, records):
            x = record["args"][0] if record["args"] else record["kwargs"]["hidden_states"]
            args = (x, *record["args"][1:]) if record["args"] else ()
            kwargs = record["kwargs"]
            if "shared_kv_states" in kwargs:
                finetuned_store = dict(kwargs["shared_kv_states"])
                store = finetuned_store if pt_reads_ft_keys_values else pretrained_keys_values
                kwargs = {**kwargs, "shared_kv_states": store}
            out_pt = block(*args, **kwargs)
            out_pt = out_pt[0] if isinstance(out_pt, tuple) else out_pt
            ptc_l = out_pt.float() - x.float()
            ptc.append(ptc_l)
            ftc.append(record["out"].float() - x.float() - ptc_l)
    x0 = (records[0]["args"][0] if records[0]["args"] else records[0]["kwargs"]["hidden_states"]).float()
    return torch.stack(ptc, 1), torch.stack(ftc, 1), x0, records[-1]["out"].float()


def last_index(attention_mask):
    return attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)


def tuco_at_last(ptc, ftc, attention_mask):
    """TuCo from the oracle's components, at the last real token, summing layers before the L1 norm."""
    t = last_index(attention_mask)
    rows = torch.arange(ptc.shape[0])
    p = ptc[rows, :, t].sum(1).abs().sum(-1)
    f = ftc[rows, :, t].sum(1).abs().sum(-1)
    return f / (p + f)
