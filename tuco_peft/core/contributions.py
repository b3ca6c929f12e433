"""The result of a decomposition, and TuCo computed from it (Nuti et al., ICML 2025, Def. 4.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import Field, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from typing_extensions import Self

    from ..views import TokenReport


def tuco_from_sums(ptc_sum: torch.Tensor, ftc_sum: torch.Tensor) -> torch.Tensor:
    """‖ΣFTC‖₁ / (‖ΣPTC‖₁ + ‖ΣFTC‖₁) over the last (d_model) axis; 0 where both sums vanish.

    A NaN or inf in the components propagates (as NaN): an overflow must not read as "no fine-tuning".
    """
    return tuco_from_norms(ptc_sum.abs().sum(-1), ftc_sum.abs().sum(-1))


def tuco_from_norms(ptc_norm: torch.Tensor, ftc_norm: torch.Tensor) -> torch.Tensor:
    """TuCo from ‖ΣPTC‖₁ and ‖ΣFTC‖₁ (``tuco_from_sums`` once the sums are reduced)."""
    total = ptc_norm + ftc_norm
    share = torch.where(total == 0, 0.0, ftc_norm / total.clamp_min(torch.finfo(total.dtype).tiny))
    return torch.where(total.isfinite(), share, float("nan"))


_REPR_VALUES = 6  # TuCo values a repr shows


class _TokenContributions:
    """What every decomposition answers from its per-position sums over blocks: TuCo, PreCo and the token view."""

    x0: torch.Tensor
    xL: torch.Tensor
    positions: torch.Tensor

    # Each field's positions axis (after batch, and after the layers for per-block fields), for ``at``.
    _POSITIONS_AXIS: ClassVar[dict[str, int]]
    # Set by @dataclass on each subclass, which ``fields(self)`` reads.
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ΣPTC and ΣFTC over the blocks, in block order: [batch, d_model] (or [batch, k, d_model])."""
        raise NotImplementedError

    def layer_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """‖PTC_l‖₁ and ‖FTC_l‖₁ of each block: two [batch, n_layers] (or [batch, n_layers, k]) tensors."""
        raise NotImplementedError

    def at(self, columns: torch.Tensor) -> Self:
        """One decomposed position per prompt (``columns`` [batch] indexes the positions axis), shaped as for
        ``positions="last"``."""
        rows = torch.arange(len(columns), device=self.x0.device)
        columns = columns.to(self.x0.device)
        return type(self)(
            **{name: getattr(self, name).movedim(axis, 1)[rows, columns] for name, axis in self._POSITIONS_AXIS.items()}
        )

    @property
    def tuco(self) -> torch.Tensor:
        """Tuning Contribution, in [0, 1]: [batch] (or [batch, k])."""
        return tuco_from_sums(*self._sums())

    @property
    def preco(self) -> torch.Tensor:
        """Pre-training contribution, 1 − TuCo."""
        return 1.0 - self.tuco

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
        from ..views import TokenReport, texts_from_decomposition

        texts = texts_from_decomposition(self, input_ids, attention_mask, tokenizer, titles)
        return TokenReport(texts, "TuCo per token")

    def __repr__(self) -> str:
        """Shapes and TuCo, not every tensor (printed whole, one 5-token prompt runs to about 90 lines)."""
        shapes = ", ".join(f"{field.name}={list(getattr(self, field.name).shape)}" for field in fields(self))
        tuco = self.tuco
        if tuco.ndim == 1:
            shown = ", ".join(f"{value:.4f}" for value in tuco[:_REPR_VALUES].tolist())
            summary = f"tuco=[{shown}{', …' if len(tuco) > _REPR_VALUES else ''}]"
        else:
            summary = f"tuco per position {list(tuco.shape)}"
        return f"{type(self).__name__}({shapes}; {summary})"

    def _repr_html_(self) -> str:
        """Notebook display: TuCo at each decomposed position (token text needs ``view(tokenizer, input_ids)``)."""
        return self.view()._repr_html_()


@dataclass(repr=False)
class Decomposition(_TokenContributions):
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

    _POSITIONS_AXIS: ClassVar[dict[str, int]] = {"ptc": 2, "ftc": 2, "x0": 1, "xL": 1, "positions": 1}

    @property
    def n_layers(self) -> int:
        return self.ptc.shape[1]

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ptc.sum(1), self.ftc.sum(1)

    def layer_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """‖PTC_l‖₁ and ‖FTC_l‖₁ of each block: two [batch, n_layers] (or [batch, n_layers, k]) tensors."""
        return self.ptc.abs().sum(-1), self.ftc.abs().sum(-1)

    def cumulative_tuco(self) -> torch.Tensor:
        """TuCo of the components of blocks 0..l, for each l: [batch, n_layers] (or [batch, n_layers, k]).

        The last entry is ``tuco``; entry l is the last-token analogue of the paper's β_{l+1} (§4.4).
        """
        return tuco_from_sums(self.ptc.cumsum(1), self.ftc.cumsum(1))


_NO_COMPONENTS = "only sums over blocks were kept: decompose with keep='all' for the per-block components."


@dataclass(repr=False)
class DecompositionSums(_TokenContributions):
    """A decomposition reduced block by block as it is computed (``decompose(keep="sums")``), in float32.

    It holds what TuCo per token needs, so memory grows with the sequence, not with layers × sequence ×
    width: ΣPTC and ΣFTC over the blocks, ‖PTC_l‖₁ and ‖FTC_l‖₁ and the cumulative TuCo per block, and
    x0/xL. Shapes as ``Decomposition``'s (ptc_sum/ftc_sum like x0; the per-block tensors like its
    ``layer_norms()``), zero at padding. The per-block vectors themselves are gone: ``.ptc``/``.ftc`` raise.
    """

    ptc_sum: torch.Tensor
    ftc_sum: torch.Tensor
    ptc_l1: torch.Tensor
    ftc_l1: torch.Tensor
    cumulative: torch.Tensor
    x0: torch.Tensor
    xL: torch.Tensor
    positions: torch.Tensor

    _POSITIONS_AXIS: ClassVar[dict[str, int]] = {
        "ptc_sum": 1, "ftc_sum": 1, "ptc_l1": 2, "ftc_l1": 2, "cumulative": 2, "x0": 1, "xL": 1, "positions": 1
    }

    @property
    def n_layers(self) -> int:
        return self.ptc_l1.shape[1]

    @property
    def ptc(self) -> torch.Tensor:
        raise AttributeError(_NO_COMPONENTS)

    @property
    def ftc(self) -> torch.Tensor:
        raise AttributeError(_NO_COMPONENTS)

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ptc_sum, self.ftc_sum

    def layer_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """‖PTC_l‖₁ and ‖FTC_l‖₁ of each block: two [batch, n_layers] (or [batch, n_layers, k]) tensors."""
        return self.ptc_l1, self.ftc_l1

    def cumulative_tuco(self) -> torch.Tensor:
        """TuCo of the components of blocks 0..l, for each l: [batch, n_layers] (or [batch, n_layers, k])."""
        return self.cumulative

    @property
    def tuco(self) -> torch.Tensor:
        """Tuning Contribution, in [0, 1]: [batch] (or [batch, k]); the cumulative TuCo at the last block, which
        is TuCo of the very sums ``ptc_sum`` and ``ftc_sum`` (their L1 norms were taken as they were summed)."""
        return self.cumulative.select(1, -1)
