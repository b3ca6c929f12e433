"""The result of a decomposition, and TuCo computed from it (Nuti et al., ICML 2025, Def. 4.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .views import TokenReport


def tuco_from_sums(ptc_sum: torch.Tensor, ftc_sum: torch.Tensor) -> torch.Tensor:
    """‖ΣFTC‖₁ / (‖ΣPTC‖₁ + ‖ΣFTC‖₁) over the last (d_model) axis; 0 where both sums vanish.

    A NaN or inf in the components propagates (as NaN): an overflow must not read as "no fine-tuning".
    """
    ftc_norm = ftc_sum.abs().sum(-1)
    total = ptc_sum.abs().sum(-1) + ftc_norm
    share = torch.where(total == 0, 0.0, ftc_norm / total.clamp_min(torch.finfo(total.dtype).tiny))
    return torch.where(total.isfinite(), share, float("nan"))


@dataclass
class Decomposition:
    """Per-block pre-trained (PTC) and fine-tuning (FTC) components of the residual stream, in float32.

    With ``positions="last"`` the shapes are ptc/ftc ``[batch, n_layers, d_model]`` and x0/xL
    ``[batch, d_model]``; otherwise a positions axis follows the layer axis (``[batch, n_layers, k,
    d_model]`` and ``[batch, k, d_model]``), zero at padding. ``x0 + ptc.sum(1) + ftc.sum(1) == xL``.
    """

    ptc: torch.Tensor
    ftc: torch.Tensor
    x0: torch.Tensor
    xL: torch.Tensor
    positions: torch.Tensor  # token index of each decomposed row: [batch] or [batch, k]

    @property
    def n_layers(self) -> int:
        return self.ptc.shape[1]

    @property
    def tuco(self) -> torch.Tensor:
        """Tuning Contribution, in [0, 1]: [batch] (or [batch, k])."""
        return tuco_from_sums(self.ptc.sum(1), self.ftc.sum(1))

    @property
    def preco(self) -> torch.Tensor:
        """Pre-training contribution, 1 − TuCo."""
        return 1.0 - self.tuco

    def layer_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """‖PTC_l‖₁ and ‖FTC_l‖₁ of each block: two [batch, n_layers] (or [batch, n_layers, k]) tensors."""
        return self.ptc.abs().sum(-1), self.ftc.abs().sum(-1)

    def cumulative_tuco(self) -> torch.Tensor:
        """TuCo of the components of blocks 0..l, for each l: [batch, n_layers] (or [batch, n_layers, k]).

        The last entry is ``tuco``; entry l is the last-token analogue of the paper's β_{l+1} (§4.4).
        """
        return tuco_from_sums(self.ptc.cumsum(1), self.ftc.cumsum(1))

    def view(
        self,
        tokenizer: Any | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        titles: Sequence[str] | None = None,
    ) -> TokenReport:
        """The prompts with each decomposed token coloured by its TuCo: shows in a notebook, ``.save("x.html")``.

        Pass the ``input_ids`` (and ``attention_mask``) that were decomposed and the ``tokenizer`` to see the
        text; without them the decomposed positions are shown as ``[index]``. See ``tuco_peft.views``.
        """
        from .views import TokenReport, texts_from_decomposition

        texts = texts_from_decomposition(self, input_ids, attention_mask, tokenizer, titles)
        return TokenReport(texts, "TuCo per token")

    def _repr_html_(self) -> str:
        """Notebook display: TuCo at each decomposed position (token text needs ``view(tokenizer, input_ids)``)."""
        return self.view()._repr_html_()
