"""What a decomposition keeps of each block as the forward reaches it: every PTC and FTC (``keep="all"``) or
running sums and per-block norms (``keep="sums"``), with the checks that x_L = x_0 + ΣPTC + ΣFTC holds."""

from __future__ import annotations

from typing import NoReturn

import torch

from ..errors import TuCoError, UnsupportedModelError
from ..model.inputs import Batch
from .contributions import Decomposition, DecompositionSums, tuco_from_norms


class Components:
    """Receives each block's rows as the forward reaches it, splits its update into PTC and FTC, and checks
    that the residual stream runs unchanged from one block into the next. Subclasses decide what is kept.

    A small call is bound by the number of tensor operations per block, not by their arithmetic, so each block
    costs a handful: the checks (finite components, each block's input equal to the previous block's output)
    are decided once, after the forward, from what the blocks left behind.
    """

    def __init__(self, n_layers: int, batch: Batch):
        self.n_layers = n_layers
        self.batch = batch
        # Padding rows are zeroed block by block, so the reductions see the same values as ``keep="all"``.
        real = None if batch.unpadded else batch.row_is_real
        self.real: torch.Tensor | None = None if real is None or bool(real.all()) else real[..., None]
        all_positions = torch.arange(batch.input_ids.shape[1], device=batch.rows.device)
        self.every_position = batch.rows.shape[1] == len(all_positions) and bool((batch.rows == all_positions).all())
        self.x0: torch.Tensor | None = None
        self.xL: torch.Tensor | None = None
        self.blocks_seen = 0
        # Set by ``hold_blocks``: each block's (input, pre-trained output, fine-tuned output), in block order.
        self._held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def rows_of(self, states: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``states`` [b, seq, ...] at the decomposed rows (of ``batch``: this one, or its copy on the device
        where a block ran), in float32; with every position in order, the states themselves (no copy of a
        float32 model's activations)."""
        return states.float() if self.every_position else batch.gather(states).float()

    def hold_blocks(self) -> None:
        """From now on ``add_outputs`` only holds on to each block's states, and the components of all blocks are
        computed together when the result is asked for: a few operations in all instead of a dozen per block,
        where a small call pays for each operation, not for its size. For small batches only: every block's
        states stay alive until then."""
        self._held = []

    def add_outputs(self, index: int, x: torch.Tensor, pretrained: torch.Tensor, finetuned: torch.Tensor) -> None:
        """Block ``index``'s input and both outputs, [b, seq, d] each (a paired block's)."""
        if self._held is not None:
            if index != len(self._held):
                self._discontinuity(index)
            self._held.append((x, pretrained, finetuned))
            return
        x_rows = self.rows_of(x, self.batch)
        self.add(index, x_rows, self.rows_of(finetuned, self.batch), self.rows_of(pretrained, self.batch) - x_rows)

    def _add_held(self) -> None:
        """The held blocks' components, all at once: one gather of every state's rows, then ``_keep_all``."""
        held, self._held = self._held, None
        if held is None:
            return
        if len(held) != self.n_layers:  # a block skipped (or none ran)
            self._discontinuity(len(held))
        for index, states in enumerate(held):
            if any(state.shape != held[0][0].shape for state in states):
                self._discontinuity(index)
        stacked = torch.stack([state for states in held for state in states], dim=2)  # [b, seq, 3·blocks, ...]
        rows = (stacked.float() if self.every_position else self.batch.gather(stacked).float()).movedim(1, 2)
        x_rows, pretrained, out_rows = rows.unflatten(1, (len(held), 3)).unbind(2)  # [b, blocks, rows, ...]
        ptc, ftc = self._components(x_rows, out_rows, pretrained - x_rows, blocks_axis=True)
        previous = torch.cat([x_rows[:, :1], out_rows[:, :-1]], dim=1)
        self.x0, self.xL = x_rows[:, 0], out_rows[:, -1]
        self._keep_all(ptc, ftc, previous, x_rows)
        self.blocks_seen = len(held)

    def _keep_all(self, ptc: torch.Tensor, ftc: torch.Tensor, previous_out: torch.Tensor, x_rows: torch.Tensor) -> None:
        """``_keep`` of every block at once: each argument [b, n_layers, rows, ...]."""
        raise NotImplementedError

    def add(self, index: int, x_rows: torch.Tensor, out_rows: torch.Tensor, ptc: torch.Tensor) -> None:
        previous = self.xL
        if index != self.blocks_seen or (previous is not None and previous.shape != x_rows.shape):
            self._discontinuity(index)
        ptc, ftc = self._components(x_rows, out_rows, ptc)
        if previous is None:
            self.x0 = x_rows
        self.xL = out_rows
        self._keep(index, ptc, ftc, x_rows if previous is None else previous, x_rows)
        self.blocks_seen += 1

    def _components(
        self, x_rows: torch.Tensor, out_rows: torch.Tensor, ptc: torch.Tensor, blocks_axis: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PTC and FTC of an update, zero at padding rows (``blocks_axis``: every block's, [b, n_layers, ...])."""
        ftc = (out_rows - x_rows) - ptc
        if self.real is None:
            return ptc, ftc
        real = self.real[:, None] if blocks_axis else self.real
        return ptc * real, ftc * real

    def _keep(
        self, index: int, ptc: torch.Tensor, ftc: torch.Tensor, previous_out: torch.Tensor, x_rows: torch.Tensor
    ) -> None:
        """Keep block ``index``'s components, and what tells whether its input ``x_rows`` was the previous
        block's output ``previous_out`` (the first block's own input)."""
        raise NotImplementedError

    def _discontinuity(self, index: int) -> NoReturn:
        raise UnsupportedModelError(
            f"the residual stream changes between blocks {index - 1} and {index} (or a block was skipped), so "
            "x_L ≠ x_0 + ΣPTC + ΣFTC for this architecture."
        )

    def _ends(self, finite: torch.Tensor, continues: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x0, xL and the positions, after checking that every block ran, on finite components (``finite``
        [n_layers] bool), each taking the previous block's output as its input (``continues``).

        FTC alone tells finiteness: FTC = (out − x) − PTC is NaN or infinite wherever any of the three is (also
        at padding rows, zeroed by a product that keeps a NaN)."""
        if self.blocks_seen != self.n_layers:
            self._discontinuity(self.blocks_seen)
        if not bool((finite & continues).all()):  # one wait for the device where all is well
            self._refuse(finite, continues)
        x0, xL = self.x0, self.xL
        assert x0 is not None and xL is not None, "every block ran, so the first set x0 and the last xL"
        if self.real is not None:
            x0, xL = x0 * self.real, xL * self.real
        return self._squeezed(x0, 1), self._squeezed(xL, 1), self._squeezed(self.batch.rows, 1)

    def _refuse(self, finite: torch.Tensor, continues: torch.Tensor) -> NoReturn:
        if not bool(finite.all()):
            block = int((~finite).nonzero()[0])
            raise TuCoError(
                f"the hidden states or the pre-trained path hold NaN or infinity from block {block} on (NaN or "
                "infinite weights, or an overflow in float16), so TuCo is undefined; check the checkpoint's "
                "weights, or load it in float32 or bfloat16."
            )
        self._discontinuity(int((~continues).nonzero()[0]))  # on finite states, a difference is a real one

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
        # Whether each block's input differs from the previous block's output, kept on the device (a Python
        # bool would make the host wait for every block) and allocated before the forward: small tensors that
        # outlive each block would sit between its large temporaries and fragment the heap.
        self._gaps = torch.zeros(n_layers, dtype=torch.bool, device=batch.input_ids.device)

    def _keep(
        self, index: int, ptc: torch.Tensor, ftc: torch.Tensor, previous_out: torch.Tensor, x_rows: torch.Tensor
    ) -> None:
        if self.ptc is None or self.ftc is None:  # the first block: both are allocated together
            shape = (ptc.shape[0], self.n_layers, *ptc.shape[1:])
            self.ptc, self.ftc = ptc.new_empty(shape), ftc.new_empty(shape)
        self.ptc[:, index] = ptc
        self.ftc[:, index] = ftc
        self._gaps[index] = (x_rows != previous_out).any()

    def _keep_all(self, ptc: torch.Tensor, ftc: torch.Tensor, previous_out: torch.Tensor, x_rows: torch.Tensor) -> None:
        self.ptc, self.ftc = ptc.contiguous(), ftc.contiguous()
        self._gaps.copy_((x_rows != previous_out).flatten(2).any(2).any(0))

    def result(self) -> Decomposition:
        self._add_held()
        assert self.ptc is not None and self.ftc is not None, "a decoder has at least one block"
        finite = self.ftc.isfinite().flatten(2).all(2).all(0)
        x0, xL, positions = self._ends(finite, ~self._gaps)
        ptc, ftc = self._squeezed(self.ptc, 2), self._squeezed(self.ftc, 2)
        return Decomposition(ptc=ptc, ftc=ftc, x0=x0, xL=xL, positions=positions)


# What ``RunningSums`` reduces to an L1 norm at every block, in one stacked reduction where the rows are few
# (one per prompt, on a small batch).
_PTC, _FTC, _PTC_SUM, _FTC_SUM, _GAP = range(5)
_ONE_REDUCTION_MAX_ELEMENTS = 2**16


class RunningSums(Components):
    """Reduces each block's PTC and FTC as soon as they exist (``keep="sums"``): running ΣPTC and ΣFTC in
    block order, and per block the L1 norms of its PTC and FTC and of both sums (the cumulative TuCo is
    computed from the latter after the forward), so memory does not grow with depth."""

    def __init__(self, n_layers: int, batch: Batch):
        super().__init__(n_layers, batch)
        self.ptc_sum: torch.Tensor | None = None
        self.ftc_sum: torch.Tensor | None = None
        # [n_layers, 5, batch, rows]: per block the L1 norms listed above, allocated before the forward (see
        # ``AllComponents._gaps``); the gap between a block's input and the previous block's output is 0
        # exactly where they are equal.
        self._norms = torch.empty(
            (n_layers, 5, *batch.rows.shape), dtype=torch.float32, device=batch.input_ids.device
        )

    def _keep(
        self, index: int, ptc: torch.Tensor, ftc: torch.Tensor, previous_out: torch.Tensor, x_rows: torch.Tensor
    ) -> None:
        self.ptc_sum = ptc if self.ptc_sum is None else self.ptc_sum + ptc
        self.ftc_sum = ftc if self.ftc_sum is None else self.ftc_sum + ftc
        reduced = (ptc, ftc, self.ptc_sum, self.ftc_sum, x_rows - previous_out)
        if ptc.numel() <= _ONE_REDUCTION_MAX_ELEMENTS:  # bound by the count of operations: one for all five
            self._norms[index] = torch.stack(reduced).abs().sum(-1)
        else:  # bound by memory: no temporary of five times the rows (the same sums, row by row)
            self._norms[index] = torch.stack([values.abs().sum(-1) for values in reduced])

    def _keep_all(self, ptc: torch.Tensor, ftc: torch.Tensor, previous_out: torch.Tensor, x_rows: torch.Tensor) -> None:
        ptc_sums, ftc_sums = _running_sums(ptc), _running_sums(ftc)
        reduced = torch.stack((ptc, ftc, ptc_sums, ftc_sums, x_rows - previous_out))  # [5, b, n_layers, rows, d]
        self._norms.copy_(reduced.abs().sum(-1).permute(2, 0, 1, 3))
        self.ptc_sum, self.ftc_sum = ptc_sums[:, -1], ftc_sums[:, -1]

    def result(self) -> DecompositionSums:
        self._add_held()
        norms = self._norms.permute(1, 2, 0, 3)  # [5, batch, n_layers, rows]
        finite = norms[_FTC].isfinite().all(2).all(0)
        x0, xL, positions = self._ends(finite, (norms[_GAP] == 0).all(2).all(0))
        ptc_sum, ftc_sum = self.ptc_sum, self.ftc_sum
        assert ptc_sum is not None and ftc_sum is not None, "a decoder has at least one block"
        cumulative = tuco_from_norms(norms[_PTC_SUM], norms[_FTC_SUM])
        ptc_l1, ftc_l1, cumulative = (self._squeezed(values, 2) for values in (norms[_PTC], norms[_FTC], cumulative))
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


def _running_sums(values: torch.Tensor) -> torch.Tensor:
    """Sums of ``values`` [b, n_layers, ...] over blocks 0..l, for each l, added in block order in float32, as
    ``RunningSums.add`` adds them block by block (``cumsum`` accumulates in double on a CPU: other bits)."""
    sums = [values[:, 0]]
    for layer in range(1, values.shape[1]):
        sums.append(sums[-1] + values[:, layer])
    return torch.stack(sums, dim=1)
