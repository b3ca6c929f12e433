"""The pre-trained path of one decoder block, evaluated on the fine-tuned hidden states.

The pre-trained block at a query row needs its query there and its keys/values at every position;
everything after attention is position-wise. Three strategies, chosen per block:

- ``SharedProjectionBlock`` (adapter fine-tunes of a registered family, ``tuco_peft.families``). The
  pre-trained q/k/v are the *base* projections of the same (normed) hidden states, which every LoRA linear
  computes before adding its low-rank delta: captured during the fine-tuned forward, for free (a tuner that
  changes its input or weight first, such as OFT, costs one more call of that projection, ``lora.kinds``).
  The rest of the block runs on the requested rows only, wired as the family's spec says.
- ``OwnProjectionBlock`` (a separate pre-trained model of a registered family): the pre-trained block
  computes its own keys/values at every position and everything else on the requested rows only.
- ``SharedReadBlock`` (the same, on small batches, and on a mixture of experts without adapters at any size):
  the pre-trained rows ride along in the fine-tuned forward's own calls of the attention output projection and
  the MLP, appended to their inputs, so each of those weights is read once for both paths. A small batch is
  bound by weight reads, not arithmetic: there, reading the block's weights a second time for a few rows would
  cost nearly a second forward. So is a mixture of experts at a few rows, whatever the batch: they route to
  most of its experts, whose weights the whole batch reads once.
- ``ReplayBlock`` (any other block): the pre-trained block runs in full on the inputs the fine-tuned
  forward gave its twin. Exact for any architecture, at the cost of a second pass through the block.

``pretrained_update`` takes the pre-trained block as an argument (``io.block_sources.PretrainedBlocks.block``): the
fine-tuned block itself with its adapters switched off, the same block of another model, or one streamed
from disk.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from ..families import (
    FamilySpec,
    QKNorm,
    QKVLayout,
    WindowSource,
    Wiring,
    attention_heads,
    attention_implementation,
    derive_spec,
    spec_for,
    spec_readings,
)
from ..lora.adapters import adapters_disabled, has_pretrained_projection, is_additive_lora, pretrained_projection
from ..lora.backend import LoraLinearBackend
from ..model.attention import RotaryTables, attend_rows
from ..model.block_args import hidden_states
from ..model.inputs import Batch
from ..model.interception import any_forward_replaced, class_forwards, hooked, replaced_forward, submodules
from ..model.inventory import is_switchable, outermost_switchable


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer or its MLP returns: transformers 5's layers return a tensor, older
    versions a tuple; some mixtures of experts return their router's scores beside them (gpt-oss)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class LayoutMismatch(RuntimeError):
    """A block's forward did not call its parts as its family's spec says."""


class ReplayBlock:
    """Pre-trained path of any block: run the pre-trained block (adapters off) in full."""

    # Whether ``pretrained_update`` runs modules of the pre-trained block it is given (a ``SharedReadBlock``
    # computed everything during the fine-tuned forward, so its caller need not switch any adapter off).
    needs_pretrained_block: ClassVar[bool] = True

    def capturing(self, backend: LoraLinearBackend, batch: Batch) -> AbstractContextManager[None]:
        return nullcontext()

    def pretrained_update(
        self, pretrained: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any], batch: Batch
    ) -> torch.Tensor:
        out = block_output(pretrained.forward(*args, **kwargs))
        return batch.gather(out.float() - x.float())


def has_parts(layer: nn.Module, spec: FamilySpec) -> bool:
    """The layer has every part its family's spec names (a custom block of a known family may not)."""
    if not all(hasattr(layer, name) for name in spec.layer_parts):
        return False
    attention = getattr(layer, spec.attention)
    return all(hasattr(attention, name) for name in spec.attention_parts)


def _apply(layer: nn.Module, norm: str | None, states: torch.Tensor) -> torch.Tensor:
    """``states`` through the layer's norm ``norm``, or unchanged where the wiring has none there."""
    return states if norm is None else getattr(layer, norm)(states)


class _RowwiseBlock:
    """Attention at the requested rows, then the position-wise rest of the block on those rows only.

    Subclasses supply the pre-trained projections (query at the rows, keys and values everywhere).
    """

    needs_pretrained_block: ClassVar[bool] = True

    def __init__(self, layer: nn.Module, spec: FamilySpec, config: PretrainedConfig):
        attention = getattr(layer, spec.attention)
        self.spec = spec
        self.n_heads, self.n_kv_heads = attention_heads(config)
        self.head_dim = getattr(attention, spec.head_dim)
        self.scaling = attention.scaling
        self.sliding_window = {
            WindowSource.NONE: None,
            WindowSource.ATTENTION: getattr(attention, "sliding_window", None),
            WindowSource.CONFIG: getattr(config, "sliding_window", None),
        }[spec.window]
        self.softcap = getattr(attention, "attn_logit_softcapping", None)
        self.eager = attention_implementation(config) == "eager"
        # The head width where the rotary tables are to be read over the whole head (gpt-oss), and the names under
        # which a forward shares its tables, per way of reading them
        self.whole_head = self.head_dim if spec.rotary_whole_head else None
        reading = f"{self.whole_head}, {'interleaved' if spec.rotary_interleaved else 'rotate-half'}"
        self.rotary_names = (f"rotary at rows, {reading}", f"rotary, {reading}")

    def capturing(self, backend: LoraLinearBackend, batch: Batch) -> AbstractContextManager[None]:
        return nullcontext()

    def standing_by(self) -> AbstractContextManager[None]:
        """While it lasts, a call of the block's modules (a replay inside the forward) is not this path's."""
        return nullcontext()

    def _split(self, projections: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(query, key, value), each [b, seq, heads·hd], from the projections' outputs."""
        if self.spec.qkv_layout is QKVLayout.SEPARATE:
            return tuple(projections)
        rows = self.spec.qkv_rows(self.n_heads, self.n_kv_heads, self.head_dim)
        return tuple(part.of(projections[0], dim=-1) for part in rows)

    def _projections(
        self, pretrained: nn.Module, x: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query [b, rows, heads·hd], key and value [b, seq, kv_heads·hd]) of the pre-trained block."""
        raise NotImplementedError

    def _attend(
        self,
        attention: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kwargs: dict[str, Any],
        batch: Batch,
    ) -> torch.Tensor:
        bsz, seq = key.shape[:2]
        if self.spec.qk_norm is QKNorm.FULL_WIDTH:
            query, key = _apply(attention, "q_norm", query), _apply(attention, "k_norm", key)
        query = query.reshape(bsz, -1, self.n_heads, self.head_dim)
        key = key.reshape(bsz, seq, self.n_kv_heads, self.head_dim)
        value = value.reshape(bsz, seq, self.n_kv_heads, self.head_dim)
        if self.spec.qk_norm is QKNorm.PER_HEAD:
            query, key = _apply(attention, "q_norm", query), _apply(attention, "k_norm", key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if self.spec.rotary_module is not None:
            embeddings, (at_rows, everywhere) = kwargs["position_embeddings"], self.rotary_names
            query = batch.shared(at_rows, embeddings, lambda cs: self._tables(*map(batch.gather, cs))).apply(query)
            key = batch.shared(everywhere, embeddings, lambda cs: self._tables(*cs)).apply(key)
        visible = batch.key_visibility(self.sliding_window)
        sinks = None if self.spec.sinks is None else getattr(attention, self.spec.sinks)
        return attend_rows(query, key, value, visible, self.scaling, self.softcap, eager=self.eager, sinks=sinks)

    def _tables(self, cos: torch.Tensor, sin: torch.Tensor) -> RotaryTables:
        return RotaryTables.of(cos, sin, self.whole_head, self.spec.rotary_interleaved)

    def pretrained_update(
        self, pretrained: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any], batch: Batch
    ) -> torch.Tensor:
        # The residual adds stay in the model's dtype and order, as in the block itself: in bf16/fp16 the
        # fine-tuned update carries their rounding, and so must the pre-trained one, or FTC would absorb it.
        spec = self.spec
        attention = getattr(pretrained, spec.attention)
        attended = self._attend(attention, *self._projections(pretrained, x, batch), kwargs, batch)
        attn_update = self._update(pretrained, getattr(attention, spec.output)(attended), spec.post_attention_norm)
        x_rows = batch.gather(x)
        mlp_out = block_output(getattr(pretrained, spec.mlp)(self._mlp_input(pretrained, x_rows, attn_update)))
        return self._output(pretrained, x_rows, attn_update, mlp_out).float() - x_rows.float()

    def _mlp_input(self, block: nn.Module, x_rows: torch.Tensor, attn_update: torch.Tensor | None) -> torch.Tensor:
        """What the MLP sees at the rows: the normed block input (parallel wiring) or normed x + attention."""
        if self.spec.wiring is Wiring.PARALLEL:
            return _apply(block, self.spec.mlp_norm, x_rows)
        assert attn_update is not None, "a sequential block's MLP input follows its attention"
        return _apply(block, self.spec.mlp_norm, x_rows + attn_update)

    def _update(self, block: nn.Module, out: torch.Tensor, post_norm: str | None) -> torch.Tensor:
        """What the attention's or the MLP's output adds to the residual stream: through its post-norm, if any,
        and scaled by the block's residual multiplier, if any."""
        update = _apply(block, post_norm, out)
        multiplier = self.spec.residual_multiplier
        return update if multiplier is None else update * getattr(block, multiplier)

    def _output(
        self, block: nn.Module, x_rows: torch.Tensor, attn_update: torch.Tensor, mlp_out: torch.Tensor
    ) -> torch.Tensor:
        """The block's output at the rows, its sums in the block's own order."""
        mlp_update = self._update(block, mlp_out, self.spec.post_mlp_norm)
        if self.spec.wiring is Wiring.PARALLEL:
            return mlp_update + attn_update + x_rows
        return (x_rows + attn_update) + mlp_update


class SharedProjectionBlock(_RowwiseBlock):
    """Adapter fine-tunes: the pre-trained q/k/v are the base projections captured in the fine-tuned forward."""

    def __init__(self, layer: nn.Module, spec: FamilySpec, config: PretrainedConfig):
        super().__init__(layer, spec, config)
        attention = getattr(layer, spec.attention)
        self.projections = [getattr(attention, name) for name in spec.projections]
        self._base_layers = [pretrained_projection(p) for p in self.projections]
        self._captured: dict[int, torch.Tensor] = {}

    @staticmethod
    def supports(layer: nn.Module, spec: FamilySpec) -> bool:
        """The family allows it, the layer has its parts, the parts shared by every position (the attention
        norm, q/k norms) carry no adapter of their own, and each q/k/v projection has no adapter or one of a
        registered kind (``lora.kinds``: LoRA of any variant, DoRA included, LoHa, IA3, OFT, ...)."""
        if not spec.shared_projections or not has_parts(layer, spec):
            return False
        attention = getattr(layer, spec.attention)
        shared = [] if spec.attention_norm is None else [getattr(layer, spec.attention_norm)]
        if spec.qk_norm is not QKNorm.NONE:
            shared += [attention.q_norm, attention.k_norm]
        if any(is_switchable(m) for part in shared for m in part.modules()):
            return False
        projections = [getattr(attention, name) for name in spec.projections]
        return all(has_pretrained_projection(p) or not is_switchable(p) for p in projections)

    @contextmanager
    def capturing(self, backend: LoraLinearBackend, batch: Batch) -> Iterator[None]:
        """Send the base q/k/v of the fine-tuned forward to ``capture``: computed in the same fused kernel as
        the LoRA output on the Triton backend, read by hooks on the base layers otherwise."""
        try:
            # PEFT adds a mixed batch's adapters into the base output in place: the pre-trained q/k/v are copies.
            mixed = batch.adapter_names is not None
            with backend.report_base_outputs(self.projections, self.capture, copied=mixed):
                yield
        finally:  # a path is kept between calls (``ModelParts.derived``): nothing of this one stays behind
            self._captured = {}

    def capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._captured[id(module)] = output

    def _projections(
        self, pretrained: nn.Module, x: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        captured, self._captured = self._captured, {}
        missing = [i for i, base in enumerate(self._base_layers) if id(base) not in captured]
        if missing:
            raise LayoutMismatch(
                f"the block's forward did not run its projections {[self.spec.projections[i] for i in missing]}: "
                "it does not match its family's spec."
            )
        query, key, value = self._split([captured[id(base)] for base in self._base_layers])
        return batch.gather(query), key, value


SharedReads = Literal["always", "experts", "never"]
# What a path that misreads a block raises (a missing key, a shape that does not fit, ...); never out of memory.
CANDIDATE_ERRORS = (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError)


def holds_experts(mlp: nn.Module) -> bool:
    """Whether ``mlp`` is a mixture of experts: it holds their weights stacked in a 3-D parameter, as transformers
    5's MoEs do (Qwen3-MoE, Mixtral, OLMoE, gpt-oss, Granite-MoE); experts kept as a list of linears are missed,
    which costs speed only."""
    return any(parameter.ndim == 3 for parameter in mlp.parameters())


class SharedReadBlock(SharedProjectionBlock):
    """Adapter fine-tunes where weight reads bound a block: the pre-trained rows computed inside the fine-tuned
    forward.

    The fine-tuned block calls its attention output projection and its MLP once each; while it runs, those
    calls also take the pre-trained rows (appended along the sequence axis: every module on the way is
    position-wise), and each LoRA linear computes its base output on both and its adapters on the
    fine-tuned part only (``LoraLinearBackend.two_stream``: one base call). Hooks on those modules see the
    fine-tuned stream as usual; hooks inside the MLP see both parts, as in a paired block.

    A forward that calls those modules otherwise (twice, with more arguments, an MLP that returns more than its
    states), or pre-trained rows that cannot be computed as the spec says, leave the fine-tuned forward as it
    would run without tuco-peft from there on (the call at fault is made again, plainly); the block's pre-trained
    update then raises ``LayoutMismatch`` naming the fault.
    """

    needs_pretrained_block = False

    def __init__(self, layer: nn.Module, spec: FamilySpec, config: PretrainedConfig):
        super().__init__(layer, spec, config)
        self.layer = layer
        self.attention = getattr(layer, spec.attention)
        self.output = getattr(self.attention, spec.output)
        self.mlp = getattr(layer, spec.mlp)
        self.mlp_tuners = outermost_switchable(self.mlp)
        self._reset()

    @staticmethod
    def supports(layer: nn.Module, spec: FamilySpec) -> bool:
        """``SharedProjectionBlock`` applies, the MLP is no tuner layer itself, the output projection holds none
        inside it, the norms after attention carry no adapter (their pre-trained rows are computed with the
        adapters on: ``modules_to_save``), and nothing replaced their forwards (accelerate's device hooks)."""
        if not SharedProjectionBlock.supports(layer, spec):
            return False
        output, mlp = getattr(getattr(layer, spec.attention), spec.output), getattr(layer, spec.mlp)
        norms = [getattr(layer, name) for name in (spec.mlp_norm, spec.post_attention_norm, spec.post_mlp_norm) if name]
        return (
            not is_switchable(mlp)
            and not any(is_switchable(m) for norm in norms for m in norm.modules())
            and outermost_switchable(output) in ([], [output])
            and not any_forward_replaced(output)
            and not any_forward_replaced(mlp)
        )

    @staticmethod
    def pays(layer: nn.Module, spec: FamilySpec, shared_reads: SharedReads, trusted: bool) -> bool:
        """Whether this block is to share its reads: on ``"always"`` (a small batch), and on ``"experts"`` too where
        its MLP is a mixture of experts. A tuner layer inside the MLP computes both parts in one call, which needs
        them in the order it was given: a trusted (registered) spec's dense MLP keeps it, routed experts do not,
        and a spec on probation (``ProvedBlock``) may not."""
        if shared_reads == "never" or not SharedReadBlock.supports(layer, spec):
            return False
        mlp = getattr(layer, spec.mlp)
        experts = holds_experts(mlp)
        if outermost_switchable(mlp) and (experts or not trusted):
            return False
        return shared_reads == "always" or experts

    def _reset(self) -> None:
        self._block_input: tuple[torch.Tensor, dict[str, Any]] | None = None
        self._attn_update: torch.Tensor | None = None
        self._mlp_out: torch.Tensor | None = None
        self._n_pretrained_rows: int | None = None
        self._fault: str | None = None

    @contextmanager
    def capturing(self, backend: LoraLinearBackend, batch: Batch) -> Iterator[None]:
        def record(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self._block_input = (hidden_states(args, kwargs), kwargs)

        with ExitStack() as stack:
            stack.callback(self._reset)  # as the projections (``SharedProjectionBlock.capturing``)
            stack.enter_context(super().capturing(backend, batch))
            stack.enter_context(hooked(self.layer, before=record, with_kwargs=True))
            stack.enter_context(replaced_forward(self.output, self._output_forward(backend, batch)))
            stack.enter_context(replaced_forward(self.mlp, self._mlp_forward(batch)))
            for module in self.mlp_tuners:
                stack.enter_context(replaced_forward(module, self._split_forward(module, backend)))
            yield

    def standing_by(self) -> AbstractContextManager[None]:
        return class_forwards([self.output, self.mlp, *self.mlp_tuners])

    def _found_fault(self, what: str) -> None:
        """Note the first way the forward left the spec: the rest of it calls the modules as without tuco-peft."""
        if self._fault is None:
            self._fault = what
        self._n_pretrained_rows = None

    @contextmanager
    def _faults_noted(self) -> Iterator[None]:
        """Pre-trained rows that raise as the spec computes them are a fault, not the forward's end."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise
        except CANDIDATE_ERRORS as error:
            self._found_fault(f"raised {type(error).__name__} on the pre-trained rows ({error})")

    def _output_forward(self, backend: LoraLinearBackend, batch: Batch) -> Callable[..., torch.Tensor]:
        def forward(attended: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs or self._block_input is None or self._attn_update is not None:
                self._found_fault(f"called {self.spec.output} other than once, on the attended states alone")
            if self._fault is None:
                assert self._block_input is not None, "no fault: the block's input was recorded"
                x, block_kwargs = self._block_input
                with self._faults_noted():
                    query, key, value = self._projections(self.layer, x, batch)
                    attended_rows = self._attend(self.attention, query, key, value, block_kwargs, batch)
                    update_rows, update = _shared_call(self.output, attended_rows, attended, backend)
                    self._attn_update = self._update(self.layer, update_rows, self.spec.post_attention_norm)
                    return update
            return type(self.output).forward(self.output, attended, *args, **kwargs)

        return forward

    def _mlp_forward(self, batch: Batch) -> Callable[..., Any]:
        def forward(normed: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            mlp, output = self.spec.mlp, self.spec.output
            if args or kwargs or self._block_input is None or self._mlp_out is not None:
                self._found_fault(f"called {mlp} other than once, on the normed states alone")
            elif self.spec.wiring is not Wiring.PARALLEL and self._attn_update is None:
                self._found_fault(f"called {mlp} before {output}")
            if self._fault is None:
                assert self._block_input is not None, "no fault: the block's input was recorded"
                with self._faults_noted():
                    x_rows = batch.gather(self._block_input[0])
                    normed_rows = self._mlp_input(self.layer, x_rows, self._attn_update)
                    self._n_pretrained_rows = normed_rows.shape[1]
                    both = type(self.mlp).forward(self.mlp, torch.cat([normed_rows, normed], dim=1))
                    self._n_pretrained_rows = None
                    if isinstance(both, torch.Tensor):
                        self._mlp_out, out = both.split([normed_rows.shape[1], normed.shape[1]], dim=1)
                        return out
                    # gpt-oss's MoE also returns its router's scores, per token
                    self._found_fault(f"has {mlp} return more than its hidden states, which rows cannot share")
            return type(self.mlp).forward(self.mlp, normed, *args, **kwargs)

        return forward

    def _split_forward(self, module: nn.Module, backend: LoraLinearBackend) -> Callable[..., torch.Tensor]:
        """A tuner layer inside the MLP, on the pre-trained rows followed by the fine-tuned states."""

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            n_rows = self._n_pretrained_rows
            if n_rows is None:  # the MLP runs as without tuco-peft (``_found_fault``)
                return type(module).forward(module, x, *args, **kwargs)
            if args or kwargs or x.ndim != 3:  # the MLP's call is made again, plainly (``_mlp_forward``)
                raise LayoutMismatch(
                    f"the block's forward calls {type(module).__name__} inside {self.spec.mlp} in a way it cannot "
                    "pair: it does not match its family's spec."
                )
            return torch.cat(_shared_call(module, x[:, :n_rows], x[:, n_rows:], backend), dim=1)

        return forward

    def pretrained_update(
        self, pretrained: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any], batch: Batch
    ) -> torch.Tensor:
        fault = self._fault
        if fault is None and (self._attn_update is None or self._mlp_out is None):
            fault = f"did not call both {self.spec.output} and {self.spec.mlp}"
        if fault is not None:
            self._reset()
            raise LayoutMismatch(f"the block's forward {fault}: it does not match its family's spec.")
        assert self._attn_update is not None and self._mlp_out is not None
        x_rows = batch.gather(x)
        out = self._output(self.layer, x_rows, self._attn_update, self._mlp_out)
        self._reset()
        return out.float() - x_rows.float()


def _shared_call(
    module: nn.Module, x_rows: torch.Tensor, x: torch.Tensor, backend: LoraLinearBackend
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``module`` pre-trained on ``x_rows``, ``module`` fine-tuned on ``x``), each weight read once where it can."""
    if is_additive_lora(module):
        return backend.two_stream(x_rows, x, module)
    forward = type(module).forward
    if is_switchable(module):  # another tuner: its own forward, adapters off then on
        with adapters_disabled(module.modules()):
            pretrained = forward(module, x_rows)
        return pretrained, forward(module, x)
    both = forward(module, torch.cat([x_rows, x], dim=1))
    return tuple(both.split([x_rows.shape[1], x.shape[1]], dim=1))


class OwnProjectionBlock(_RowwiseBlock):
    """A separate pre-trained model: its block projects its own (normed) input, keys/values everywhere."""

    def _projections(
        self, pretrained: nn.Module, x: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attention = getattr(pretrained, self.spec.attention)
        normed = _apply(pretrained, self.spec.attention_norm, x)
        projections = [getattr(attention, name) for name in self.spec.projections]
        if self.spec.qkv_layout is not QKVLayout.SEPARATE:  # one fused projection
            query, key, value = self._split([projections[0](normed)])
            return batch.gather(query), key, value
        query = projections[0](batch.gather(normed))
        return query, projections[1](normed), projections[2](normed)


_REFUTED_MODEL_TYPES: set[str] = set()  # those warned of
# Per row, of its largest entry: the two paths sum in different orders, which in fp32 put rows of a tiny random
# Nemotron 1.1e-5 apart; a wrong reading (an interleaved rotary embedding, a NoPE layer, a residual multiplier)
# put them 5e-3 apart or more.
PROOF_TOLERANCE = 1e-4


class ProvedBlock:
    """The one-pass path of a spec read from the block's parts (``families.derive_spec``), trusted once it gave
    the generic path's update; until then, and for good where it did not, the block is replayed.

    A proof counts only where it could fail. In fp32: half precision rounds the two paths apart, so a half
    precision batch proves the candidate's reading on a float32 copy of the pre-trained block, its inputs cast
    (the pre-trained rows computed from the copy's own projections); a quantized block, which has no float32
    copy, replays until an fp32 batch proves it. And where some row attends to at least two keys: with one key,
    attention returns the value whatever its scores, so rotary embeddings, scaling, soft-capping and q/k norms
    would pass unchecked. A later batch whose rows see more keys than the block's sliding window, where the
    proofs so far did not reach it, is a new trial.

    ``readings`` are the ways to read the parts (``families.spec_readings``), the most common first, each a list
    of paths in order of preference (sharing reads first, where that pays). A path that did not find the parts
    called as it needs (``LayoutMismatch``) leaves every reading; a reading that gave another update, or raised,
    leaves with its paths; the next candidate is on trial from the next batch on. Where none is left, the block
    is refuted, with one warning per model type and process. Sharing reads assumes what the proof checks: that
    the MLP's output at a position depends on that position alone (no expert capacity shared between tokens).
    """

    def __init__(self, readings: list[list[_RowwiseBlock]], model_type: str, config: PretrainedConfig):
        self.readings = readings
        self.model_type = model_type
        self.config = config
        self.copyable = True  # whether the block has a float32 copy to prove half precision batches on
        self.replay = ReplayBlock()
        self.proved_reach = 0  # the most keys a row saw in a batch the candidate matched the replay on
        self.refuted = False

    needs_pretrained_block = True  # the replay runs the pre-trained block, and a candidate may

    @property
    def candidate(self) -> _RowwiseBlock:
        """The path on trial or trusted now."""
        return self.readings[0][0]

    def _on_trial(self, batch: Batch) -> bool:
        """Whether this batch is to prove the candidate: none has yet, or its rows see past a window no proof
        reached. Once one did (or without a window), the batch's reach is not even computed."""
        window = self.candidate.sliding_window
        if self.proved_reach < 2:
            return True
        return window is not None and self.proved_reach <= window and _reach(batch) > window

    def capturing(self, backend: LoraLinearBackend, batch: Batch) -> AbstractContextManager[None]:
        return nullcontext() if self.refuted else self.candidate.capturing(backend, batch)

    def pretrained_update(
        self, pretrained: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any], batch: Batch
    ) -> torch.Tensor:
        replay = partial(self.replay.pretrained_update, pretrained, x, args, kwargs, batch)
        if self.refuted:
            return replay()
        active = self.candidate  # whose capturing ran in this forward
        on_trial = self._on_trial(batch)
        full_precision = x.dtype in (torch.float32, torch.float64)
        update = None
        if full_precision or not on_trial:  # a half precision trial proves on a float32 copy, below
            try:
                update = active.pretrained_update(pretrained, x, args, kwargs, batch)
            except LayoutMismatch as error:
                self._drop_path(type(active), f"it raised LayoutMismatch: {error}")
            except torch.OutOfMemoryError:
                raise
            except CANDIDATE_ERRORS as error:
                if not on_trial:
                    raise
                self._drop_reading(f"it raised {type(error).__name__}: {error}")
            if update is not None and not on_trial:
                return update
        # After the candidate's own update, which reads what the forward captured: the replay runs the block's
        # modules again, as the model does
        with active.standing_by():
            exact = replay()
        if update is not None:
            self._judge(exact, update, batch)
        elif on_trial and not full_precision:
            self._prove_in_float32(pretrained, x, args, kwargs, batch)
        return exact

    def _judge(self, exact: torch.Tensor, update: torch.Tensor, batch: Batch) -> None:
        reason = self._difference(exact, update, batch.row_is_real)
        if reason is None:
            self.proved_reach = max(self.proved_reach, _reach(batch))
        else:
            self._drop_reading(reason)

    def _prove_in_float32(
        self, pretrained: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any], batch: Batch
    ) -> None:
        """The candidate's reading against the replay, both on a float32 copy of the pre-trained block, its floating
        inputs cast. A block that has no such copy (a quantized one, one whose weights live elsewhere, one too
        large for the memory left) replays until an fp32 batch proves it. In half precision the proof covers the
        reading; the trusted path then takes the pre-trained q/k/v from the fine-tuned forward, as a registered
        family's does."""
        copied = _float32_copy(pretrained) if self.copyable else None
        if copied is None:
            self.copyable = False
            return
        x, args, kwargs = _float32((x, args, kwargs))
        with torch.no_grad():
            try:
                exact = ReplayBlock().pretrained_update(copied, x, args, kwargs, batch)
            except (torch.OutOfMemoryError, AssertionError, *CANDIDATE_ERRORS):  # the copy does not run as a block
                self.copyable = False
                return
            try:
                update = OwnProjectionBlock(copied, self.candidate.spec, self.config).pretrained_update(
                    copied, x, args, kwargs, batch
                )
            except torch.OutOfMemoryError:  # the copy's own memory: no proof, and not the reading's fault
                self.copyable = False
                return
            except CANDIDATE_ERRORS as error:
                self._drop_reading(f"it raised {type(error).__name__}: {error}")
                return
        self._judge(exact, update, batch)

    def _drop_path(self, kind: type, reason: str) -> None:
        """A path of ``kind`` did not find the block's parts called as it needs, whatever the reading: every
        reading loses it."""
        self.readings = [kept for paths in self.readings if (kept := [p for p in paths if type(p) is not kind])]
        self._next(reason)

    def _drop_reading(self, reason: str) -> None:
        """The candidate's reading gave another update than the block's: its paths all would."""
        self.readings.pop(0)
        self._next(reason)

    def _next(self, reason: str) -> None:
        """The next candidate is on trial from the next batch on; where none is left, the block is refuted."""
        self.proved_reach = 0
        if self.readings:
            return
        self.refuted = True
        if self.model_type not in _REFUTED_MODEL_TYPES:
            _REFUTED_MODEL_TYPES.add(self.model_type)
            warnings.warn(
                f"tuco-peft read the layout of the {self.model_type!r} blocks from their parts, but a block's "
                f"one-pass path did not give the generic path's update ({reason}): such blocks run the generic "
                "path (exact; a second pass through the block). Registering the family's spec "
                "(tuco_peft.families.register) gives them the one-pass path.",
                stacklevel=4,
            )

    @staticmethod
    def _difference(exact: torch.Tensor, update: torch.Tensor, real: torch.Tensor) -> str | None:
        """Why the candidate's update is not the exact one at the ``real`` rows (a padding row's update is no
        one's), to ``PROOF_TOLERANCE`` of each row's largest entry; or None where it is."""
        if update.shape != exact.shape:
            return f"its shape {tuple(update.shape)} is not {tuple(exact.shape)}"
        update, exact = update[real], exact[real]
        with torch.no_grad():
            scale = exact.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
            relative = ((update - exact).abs().amax(-1) / scale).max().item()
        return None if relative <= PROOF_TOLERANCE else f"largest difference {relative:.2g} of its row's largest entry"


_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _float32_copy(block: nn.Module) -> nn.Module | None:
    """A float32 copy of ``block`` without its hooks and instance forwards (this forward's probes and
    interceptions, which reach the whole model), its parameters detached; None where it has none (weights
    quantized, offloaded by accelerate, too large for the memory left, or parts that cannot be copied)."""
    modules = [block, *submodules(block)]
    if any(not p.is_floating_point() or p.is_meta for p in block.parameters()) or any(
        hasattr(m, "_hf_hook") for m in modules
    ):
        return None
    # deepcopy takes what ``memo`` holds for an object instead of copying it
    memo: dict[int, Any] = {id(getattr(m, name)): type(getattr(m, name))() for m in modules for name in _HOOKS}
    memo.update((id(m.__dict__["forward"]), None) for m in modules if "forward" in m.__dict__)
    try:
        memo.update((id(p), nn.Parameter(p.detach().float(), requires_grad=False)) for p in block.parameters())
        copied = copy.deepcopy(block, memo)
    except (torch.OutOfMemoryError, *CANDIDATE_ERRORS):  # a part that cannot be copied (a non-leaf tensor, a lock)
        return None
    for module in (copied, *submodules(copied)):
        module.__dict__.pop("forward", None)
    return copied.float()


def _float32(value: Any) -> Any:
    """``value`` with every floating tensor in it (in tuples, lists and dicts) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_float32(item) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(item) for item in value)
    if isinstance(value, dict):
        return {key: _float32(item) for key, item in value.items()}
    return value


def _reach(batch: Batch) -> int:
    """The most keys a decomposed row of ``batch`` attends to (its real tokens up to it), made once per forward."""

    def reach(rows: torch.Tensor) -> int:
        return int((batch.attention_mask.cumsum(1).gather(1, rows) * batch.row_is_real).max())

    return batch.shared("reach", batch.rows, reach)


PretrainedPath = ReplayBlock | SharedProjectionBlock | SharedReadBlock | OwnProjectionBlock | ProvedBlock


def pretrained_path(
    layer: nn.Module,
    config: PretrainedConfig,
    *,
    separate_model: bool = False,
    replay_only: bool = False,
    shared_reads: SharedReads = "experts",
) -> PretrainedPath:
    """The cheapest exact strategy for this block (``separate_model``: the pre-trained block is another model's;
    ``shared_reads``: where the pre-trained rows may ride along in the fine-tuned calls, ``SharedReadBlock.pays``:
    ``"always"`` where the batch is small enough that weight reads, not arithmetic, bound every block)."""
    if replay_only:
        return ReplayBlock()
    spec = spec_for(layer, config)
    if spec is None:
        return _derived_path(layer, config, separate_model, shared_reads)
    if separate_model:
        return OwnProjectionBlock(layer, spec, config) if has_parts(layer, spec) else ReplayBlock()
    if SharedReadBlock.pays(layer, spec, shared_reads, trusted=True):
        return SharedReadBlock(layer, spec, config)
    if SharedProjectionBlock.supports(layer, spec):
        return SharedProjectionBlock(layer, spec, config)
    return ReplayBlock()


def _derived_path(
    layer: nn.Module, config: PretrainedConfig, separate_model: bool, shared_reads: SharedReads
) -> ProvedBlock | ReplayBlock:
    """A block of no registered family: the one-pass path of the spec its parts suggest, on probation."""
    spec = derive_spec(layer, config)
    if spec is None:
        return ReplayBlock()
    model_type = getattr(config, "model_type", "") or type(layer).__name__
    readings: list[list[_RowwiseBlock]]
    if separate_model:
        readings = [[OwnProjectionBlock(layer, reading, config)] for reading in spec_readings(spec)]
    elif SharedProjectionBlock.supports(layer, spec):
        sharing = SharedReadBlock.pays(layer, spec, shared_reads, trusted=False)
        readings = [
            [SharedReadBlock(layer, reading, config), SharedProjectionBlock(layer, reading, config)]
            if sharing
            else [SharedProjectionBlock(layer, reading, config)]
            for reading in spec_readings(spec)
        ]
    else:
        return ReplayBlock()
    return ProvedBlock(readings, model_type, config)
