"""Generation (optionally FTC_α-steered) that reports the TuCo behind every generated token.

The pre-trained path of every block runs on the generation's own cache (see ``steering``), so the PTC and
FTC of the position whose logits choose each new token come out of the forward that chooses it: no prefix
is ever re-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from ..core.contributions import tuco_from_sums
from ..errors import InputError, TuCoError
from ..lora.backend import Backend
from ..model.inputs import prepare_batch
from ..model.parts import model_parts
from .forward import Alpha, layer_alphas, steered_forward

if TYPE_CHECKING:
    from ..views import TokenReport

    class _GeneratingModel(Protocol):
        """What ``model_parts`` accepts: a PeftModel, a PeftMixedModel or a transformers causal LM."""

        def generate(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass
class SteeredGeneration:
    """``sequences`` [batch, prompt + n_new] as ``model.generate`` returns them; ``tuco`` float32 [batch, n_new].

    ``tuco[:, k]`` is the TuCo at the position whose logits chose new token k (k = 0: the last prompt
    token); NaN once a row has finished (after its end-of-sequence token, where generate only pads).
    ``output`` is whatever ``model.generate`` returned (e.g. with scores under return_dict_in_generate).
    """

    sequences: torch.Tensor
    tuco: torch.Tensor
    output: Any

    def view(
        self,
        tokenizer: Any | None = None,
        attention_mask: torch.Tensor | None = None,
        titles: Sequence[str] | None = None,
    ) -> TokenReport:
        """Prompt and continuation, each new token coloured by the TuCo behind it: shows in a notebook,
        ``.save("x.html")``. Without a ``tokenizer`` tokens show as ``[id]``; ``attention_mask`` is the
        prompts' (else leading pad tokens are dropped). See ``tuco_peft.views``."""
        from ..views import TokenReport, texts_from_generation

        return TokenReport(texts_from_generation(self, tokenizer, attention_mask, titles), "TuCo per generated token")

    def _repr_html_(self) -> str:
        """Notebook display (token ids; ``view(tokenizer)`` shows the text)."""
        return self.view()._repr_html_()


class _LastTokenTuCo:
    """Block observer: sums PTC_l and α_l·FTC_l at the last input position over the blocks of each forward."""

    def __init__(self, alphas: tuple[float, ...]):
        self.alphas = alphas
        self.steps: list[torch.Tensor] = []
        self._ptc_sum: torch.Tensor | None = None
        self._ftc_sum: torch.Tensor | None = None

    def __call__(self, index: int, x: torch.Tensor, pretrained: torch.Tensor, finetuned: torch.Tensor) -> None:
        x, pretrained, finetuned = x[:, -1].float(), pretrained[:, -1].float(), finetuned[:, -1].float()
        ptc, ftc = pretrained - x, self.alphas[index] * (finetuned - pretrained)
        if index == 0:
            self._ptc_sum, self._ftc_sum = ptc, ftc
        else:
            assert self._ptc_sum is not None and self._ftc_sum is not None  # block 0 of this forward set them
            self._ptc_sum, self._ftc_sum = self._ptc_sum + ptc, self._ftc_sum + ftc
        if index == len(self.alphas) - 1:
            self.steps.append(tuco_from_sums(self._ptc_sum, self._ftc_sum))


def _after_finish(new_tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """[batch, n_new] bool: True where an earlier new token of the row was end-of-sequence."""
    if not eos_ids:
        return torch.zeros_like(new_tokens, dtype=torch.bool)
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device))
    seen = is_eos.long().cumsum(-1)
    return torch.cat([torch.zeros_like(seen[:, :1]), seen[:, :-1]], dim=1) > 0


def _generation_setting(causal_lm: nn.Module, generate_kwargs: dict[str, Any], name: str) -> Any:
    """The value ``generate`` will use for ``name``: its keyword, else the passed config, else the model's."""
    if name in generate_kwargs:
        return generate_kwargs[name]
    config = generate_kwargs.get("generation_config") or causal_lm.generation_config
    return getattr(config, name, None)


def _eos_ids(causal_lm: nn.Module, generate_kwargs: dict[str, Any]) -> list[int]:
    eos = _generation_setting(causal_lm, generate_kwargs, "eos_token_id")
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    return [int(t) for t in (eos if isinstance(eos, list) else [eos])]


def _refuse_unfollowable_decoding(causal_lm: nn.Module, generate_kwargs: dict[str, Any]) -> None:
    """Beam search reorders rows and assisted decoding scores several tokens per forward: refuse both up front."""
    if (_generation_setting(causal_lm, generate_kwargs, "num_beams") or 1) != 1:
        raise InputError(
            "tuco_peft.generate follows one sequence per row and cannot track TuCo through beam reordering "
            "(num_beams > 1, from the arguments, generation_config or the model's generation_config); use "
            "`with ftc_scale(model, alpha): model.generate(..., num_beams=k)` for beam search."
        )
    for name in ("assistant_model", "prompt_lookup_num_tokens"):
        if _generation_setting(causal_lm, generate_kwargs, name) is not None:
            raise InputError(
                f"tuco_peft.generate needs one forward per generated token; {name} (assisted or speculative "
                "decoding) verifies several tokens per forward. Drop it, or use "
                "`with ftc_scale(model, alpha): model.generate(...)` without TuCo."
            )


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    alpha: Alpha = 1.0,
    base_model: nn.Module | str | Path | None = None,
    backend: Backend | None = None,
    **generate_kwargs: Any,
) -> SteeredGeneration:
    """``model.generate`` under ``ftc_scale(model, alpha, base_model=base_model)``, with the TuCo of every
    generated token.

    ``base_model`` is the pre-trained model of a full fine-tune (loaded, or a safetensors checkpoint
    path), as in ``decompose``; omit it for adapter fine-tunes. ``backend`` as in ``ftc_scale``.

    At α = 1 (default) ``tuco[:, k]`` equals ``decompose(model, prefix, base_model=base_model).tuco`` for
    the prefix that precedes new token k. At α ≠ 1 it is TuCo of the steered trajectory with the
    fine-tuning component as applied: ‖Σ_l α_l·FTC_l‖₁ / (‖Σ_l PTC_l‖₁ + ‖Σ_l α_l·FTC_l‖₁), with PTC_l,
    FTC_l taken at the steered states x_l (so α = 0 gives 0: the fine-tune contributes nothing).

    Prompts must be left-padded (as for any batched decoder-only generation). Beam search is refused
    here, because beams are reordered after the TuCo of a step is taken, whether ``num_beams`` comes
    as a keyword, in ``generation_config`` or from the model's own generation config; use
    ``with ftc_scale(model, alpha): model.generate(..., num_beams=k)`` for steered beam search. Assisted
    decoding (``assistant_model``, ``prompt_lookup_num_tokens``) is refused too: it scores several
    tokens in one forward.
    """
    parts = model_parts(model)
    _refuse_unfollowable_decoding(parts.causal_lm, generate_kwargs)
    batch = prepare_batch(input_ids, attention_mask, "last", parts.input_device)
    if not bool(batch.attention_mask[:, -1].all()):
        raise InputError(
            "the prompts are right-padded; batched generation needs left padding "
            "(tokenizer.padding_side = 'left'), so that every prompt ends at the last column."
        )
    recorder = _LastTokenTuCo(layer_alphas(alpha, parts.n_layers))
    with steered_forward(model, alpha, observer=recorder, base_model=base_model, backend=backend), torch.no_grad():
        generating = cast("_GeneratingModel", model)  # model_parts refused any other model
        output = generating.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **generate_kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    new_tokens = sequences[:, batch.input_ids.shape[1] :]
    if len(recorder.steps) != new_tokens.shape[1]:
        raise TuCoError(
            f"generate ran {len(recorder.steps)} forwards for {new_tokens.shape[1]} new tokens; TuCo per token "
            "needs one forward per token (assisted or speculative decoding is not supported)."
        )
    if not recorder.steps:
        return SteeredGeneration(sequences, torch.zeros(sequences.shape[0], 0), output)
    tuco = torch.stack(recorder.steps, dim=1)
    tuco = tuco.masked_fill(_after_finish(new_tokens, _eos_ids(parts.causal_lm, generate_kwargs)), float("nan"))
    return SteeredGeneration(sequences, tuco, output)
