"""Causal self-attention for a few query rows against every key of the sequence."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class RotaryTables(NamedTuple):
    """cos and sin of a rotary embedding, ready for states [b, heads, seq, hd]: each [b, 1, seq, rot_dim], sin
    negated where a dim's partner enters with a minus. Rotate-half (dims i and i + rot_dim/2 turn together):
    ``rotate_half(x) * sin`` is then ``x.roll(rot_dim // 2) * signed_sin``, bit for bit (a negation is exact),
    four tensor operations instead of about a dozen, which counts where every block rotates a few rows.
    Interleaved (``interleaved``: dims 2i and 2i + 1, GLM's): the partner is the pair's other dim."""

    cos: torch.Tensor
    signed_sin: torch.Tensor
    interleaved: bool = False

    @classmethod
    def of(
        cls, cos: torch.Tensor, sin: torch.Tensor, whole_head: int | None = None, interleaved: bool = False
    ) -> RotaryTables:
        """From cos/sin [b, seq, rot_dim], as a model's rotary embedding returns them. ``whole_head``: the head
        width, where the embedding turns every dim of it; tables of half that width hold each frequency once
        (gpt-oss: dims i and i + hd/2 turn together) and are doubled into the rotate-half layout.
        ``interleaved``: the table's first half of frequencies, each for a pair of adjacent dims."""
        if whole_head is not None and 2 * cos.shape[-1] == whole_head:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        half = cos.shape[-1] // 2
        if interleaved:
            cos, sin = cos[..., :half], sin[..., :half]
            paired_cos = torch.stack((cos, cos), dim=-1).flatten(-2)
            signed_sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
            return cls(paired_cos[:, None], signed_sin[:, None], interleaved=True)
        return cls(cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None])

    def apply(self, states: torch.Tensor) -> torch.Tensor:
        """The embedding of ``states``; with ``rot_dim`` smaller than ``hd`` (partial rotary, e.g. Phi-3), the
        remaining dims pass through."""
        rot_dim = self.cos.shape[-1]
        if rot_dim == states.shape[-1]:
            if self.interleaved:
                partners = states.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
            else:
                partners = states.roll(rot_dim // 2, dims=-1)
            return states * self.cos + partners * self.signed_sin
        rotary, passthrough = states[..., :rot_dim], states[..., rot_dim:]
        return torch.cat((self.apply(rotary), passthrough), dim=-1)


def apply_rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention. states [b, heads, seq, hd]; cos/sin [b, seq, rot_dim]."""
    return RotaryTables.of(cos, sin).apply(states)


def key_visibility(attention_mask: torch.Tensor, rows: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """[batch, 1, n_rows, seq] bool: which keys each query row may attend to.

    Keys must be real tokens, not after the query, and (with a sliding window) fewer than
    ``sliding_window`` positions before it, as in transformers' masks. A query always sees itself, which
    keeps padding rows finite (their values are discarded).
    """
    # Comparisons of [b, rows, 1] with [seq] indices: boolean [b, rows, seq] masks only, no integer distances
    # (at every position of a long sequence those would be 8× the mask).
    keys = torch.arange(attention_mask.shape[1], device=rows.device)
    query = rows[:, :, None]
    visible = (keys <= query) & attention_mask[:, None, :].bool()
    if sliding_window is not None:
        visible &= keys > query - sliding_window
    visible |= keys == query
    return visible[:, None]


def attend_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    *,
    eager: bool = True,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [b, heads, rows, hd]; key/value [b, kv_heads, seq, hd] → [b, rows, heads·hd], in the model dtype.

    The numerics follow the model's own attention, so that a pre-trained block equal to the fine-tuned one
    gives the same update: transformers' eager path (scores and weighted sum in the model dtype, softmax in
    fp32) for eager models, soft-capped logits and sinks, scaled_dot_product_attention otherwise. ``sinks``
    [heads]: a logit per head that joins every row's softmax and weighs no value (gpt-oss).
    """
    batch, heads, n_rows, head_dim = query.shape
    if eager or softcap is not None or sinks is not None:
        groups = heads // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(-1, -2) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        # In place: one [b, heads, rows, seq] score tensor fewer at the peak (the fill needs no saved input).
        scores = scores.masked_fill_(~visible, float("-inf"))
        if sinks is None:
            weights = scores.softmax(-1, dtype=torch.float32).to(value.dtype)
        else:  # as gpt-oss: each row less its largest logit, the softmax in the scores' dtype, the sink dropped
            sink = sinks.to(scores.dtype)[:, None, None].expand(batch, heads, n_rows, 1)
            logits = torch.cat((scores, sink), dim=-1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            weights = logits.softmax(-1, dtype=logits.dtype)[..., :-1].to(value.dtype)
        out = weights @ value
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=visible, scale=scaling, enable_gqa=key.shape[1] != heads
        )
    return out.transpose(1, 2).reshape(batch, n_rows, heads * head_dim)
