"""What a decomposition keeps of each block as the forward reaches it: every PTC and FTC (``keep="all"``) or
running sums and per-block norms (``keep="sums"``), with the checks that x_L = x_0 + ΣPTC + ΣFTC holds."""

from __future__ import annotations

from typing import NoReturn

import torch

from ..errors import TuCoError, UnsupportedModelError
from ..model.inputs import Batch
from .contributions import Decomposition, DecompositionSums, tuco_from_sums
from .pretrained_path import gather_rows


class Components:
    """Receives each block's rows as the forward reaches it, splits its update into PTC and FTC, and checks
    that the residual stream runs unchanged from one block into the next. Subclasses decide what is kept."""

    def __init__(self, n_layers: int, batch: Batch):
        self.n_layers = n_layers
        self.batch = batch
        # Padding rows are zeroed block by block, so the reductions see the same values as ``keep="all"``.
        real = batch.row_is_real
        self.real: torch.Tensor | None = None if bool(real.all()) else real[..., None]
        all_positions = torch.arange(batch.input_ids.shape[1], device=batch.rows.device)
        self.every_position = batch.rows.shape[1] == len(all_positions) and bool((batch.rows == all_positions).all())
        self.x0: torch.Tensor | None = None
        self.xL: torch.Tensor | None = None
        self.blocks_seen = 0
        # Whether each block's input was the previous block's output, and whether its output is finite, kept
        # on the device (a Python bool would make the host wait for every block) and read once, after the
        # forward. Everything kept per block is allocated before the forward and written in place: small
        # allocations that outlive each block would sit between its large temporaries and fragment the heap,
        # which then grows by several blocks' activations (as resident memory, on glibc).
        home = batch.input_ids.device
        self._continues = torch.ones(n_layers, dtype=torch.bool, device=home)
        self._finite = torch.ones(n_layers, dtype=torch.bool, device=home)

    def rows_of(self, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``states`` [b, seq, ...] at the decomposed ``rows``, in float32; with every position in order, the
        states themselves (no copy of a float32 model's activations)."""
        return states.float() if self.every_position else gather_rows(states, rows).float()

    def add(self, index: int, x_rows: torch.Tensor, out_rows: torch.Tensor, ptc: torch.Tensor) -> None:
        if index != self.blocks_seen or (self.xL is not None and self.xL.shape != x_rows.shape):
            self._discontinuity(index)
        if self.xL is not None:
            self._continues[index] = (self.xL == x_rows).all()
        self._finite[index] = torch.isfinite(out_rows).all()
        ftc = (out_rows - x_rows) - ptc
        if self.real is not None:
            ptc, ftc = ptc * self.real, ftc * self.real
        if self.x0 is None:
            self.x0 = x_rows
        self.xL = out_rows
        self._keep(ptc, ftc)
        self.blocks_seen += 1

    def _keep(self, ptc: torch.Tensor, ftc: torch.Tensor) -> None:
        raise NotImplementedError

    def _discontinuity(self, index: int) -> NoReturn:
        raise UnsupportedModelError(
            f"the residual stream changes between blocks {index - 1} and {index} (or a block was skipped), so "
            "x_L ≠ x_0 + ΣPTC + ΣFTC for this architecture."
        )

    def _ends(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x0, xL and the positions, after checking that every block ran, on finite hidden states."""
        if self.blocks_seen != self.n_layers:
            self._discontinuity(self.blocks_seen)
        finite = self._finite
        if not bool(finite.all()):
            block = int((~finite).nonzero()[0])
            raise TuCoError(
                f"the hidden states hold NaN or infinity from block {block} on (NaN or infinite weights, or an "
                "overflow in float16), so TuCo is undefined; check the checkpoint's weights, or load it in "
                "float32 or bfloat16."
            )
        if not bool(self._continues.all()):  # on finite states, a difference is a real discontinuity
            self._discontinuity(int((~self._continues).nonzero()[0]))
        x0, xL = self.x0, self.xL
        assert x0 is not None and xL is not None, "every block ran, so the first set x0 and the last xL"
        if self.real is not None:
            x0, xL = x0 * self.real, xL * self.real
        return self._squeezed(x0, 1), self._squeezed(xL, 1), self._squeezed(self.batch.rows, 1)

    def _squeezed(self, tensor: torch.Tensor, positions_axis: int) -> torch.Tensor:
        """Without the positions axis where ``positions="last"`` asked for one row per prompt."""
        return tensor.select(positions_axis, 0) if self.batch.squeeze_positions else tensor


class AllComponents(Components):
    """Keeps every block's PTC and FTC at every requested row (``keep="all"``), each written into its slot of
    the [batch, n_layers, rows, d] result as it comes, so the result is never held twice (list and stack)."""

    def __init__(self, n_layers: int, batch: Batch):
        super().__init__(n_layers, batch)
        self.ptc: torch.Tensor | None = None
        self.ftc: torch.Tensor | None = None

    def _keep(self, ptc: torch.Tensor, ftc: torch.Tensor) -> None:
        if self.ptc is None or self.ftc is None:  # the first block: both are allocated together
            shape = (ptc.shape[0], self.n_layers, *ptc.shape[1:])
            self.ptc, self.ftc = ptc.new_empty(shape), ftc.new_empty(shape)
        self.ptc[:, self.blocks_seen] = ptc
        self.ftc[:, self.blocks_seen] = ftc

    def result(self) -> Decomposition:
        x0, xL, positions = self._ends()
        assert self.ptc is not None and self.ftc is not None, "every block was kept"
        ptc, ftc = self._squeezed(self.ptc, 2), self._squeezed(self.ftc, 2)
        return Decomposition(ptc=ptc, ftc=ftc, x0=x0, xL=xL, positions=positions)


class RunningSums(Components):
    """Reduces each block's PTC and FTC as soon as they exist (``keep="sums"``): running ΣPTC and ΣFTC in
    block order, and per block their L1 norms and the cumulative TuCo, so memory does not grow with depth."""

    def __init__(self, n_layers: int, batch: Batch):
        super().__init__(n_layers, batch)
        self.ptc_sum: torch.Tensor | None = None
        self.ftc_sum: torch.Tensor | None = None
        self.per_block: torch.Tensor | None = None  # [3, batch, n_layers, rows]: ‖PTC_l‖₁, ‖FTC_l‖₁, cumulative

    def _keep(self, ptc: torch.Tensor, ftc: torch.Tensor) -> None:
        self.ptc_sum = ptc if self.ptc_sum is None else self.ptc_sum + ptc
        self.ftc_sum = ftc if self.ftc_sum is None else self.ftc_sum + ftc
        if self.per_block is None:
            self.per_block = ptc.new_empty((3, ptc.shape[0], self.n_layers, *ptc.shape[1:-1]))
        self.per_block[0, :, self.blocks_seen] = ptc.abs().sum(-1)
        self.per_block[1, :, self.blocks_seen] = ftc.abs().sum(-1)
        self.per_block[2, :, self.blocks_seen] = tuco_from_sums(self.ptc_sum, self.ftc_sum)

    def result(self) -> DecompositionSums:
        x0, xL, positions = self._ends()
        ptc_sum, ftc_sum, per_block = self.ptc_sum, self.ftc_sum, self.per_block
        assert ptc_sum is not None and ftc_sum is not None and per_block is not None, "every block was kept"
        ptc_l1, ftc_l1, cumulative = (self._squeezed(values, 2) for values in per_block)
        return DecompositionSums(
            ptc_sum=self._squeezed(ptc_sum, 1),
            ftc_sum=self._squeezed(ftc_sum, 1),
            ptc_l1=ptc_l1,
            ftc_l1=ftc_l1,
            cumulative=cumulative,
            x0=x0,
            xL=xL,
            positions=positions,
        )
