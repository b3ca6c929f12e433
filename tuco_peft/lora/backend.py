"""Which implementation computes the LoRA linears of an analysis: fused Triton kernels or plain PyTorch.

``backend="auto"`` (the default, or the ``TUCO_PEFT_BACKEND`` environment variable) picks Triton on CUDA
when it is importable; ``"torch"`` is the reference path; ``"triton"`` forces the kernels (on CPU this needs
``TRITON_INTERPRET=1`` before triton is imported). Each is a ``LoraLinearBackend``: ``TorchBackend`` or
``TritonBackend``, built from the resolved name by ``make_backend``. A layer the kernels cannot compute
(8-bit, GPTQ, AWQ, an unsupported dtype, a CPU-repacked 4-bit weight, ...) runs on the torch path, with one
warning per reason.
"""

from __future__ import annotations

import importlib
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, TypeGuard, cast

import torch
import torch.nn.modules.module as torch_module
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from ..errors import InputError, UnsupportedModelError
from ..model.interception import forward_replaced, hooked, module_hooked, replaced_forward
from .adapters import adapters_disabled, is_additive_lora, pretrained_projection
from .kinds import adapter_kind

if TYPE_CHECKING:
    from ..model.inventory import LoraModule

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV_VAR = "TUCO_PEFT_BACKEND"

Backend = Literal["auto", "torch", "triton"]
ResolvedBackend = Literal["torch", "triton"]
# Same signature as a forward hook: (base layer, its inputs, its output).
BaseOutputSink = Callable[[nn.Module, tuple, torch.Tensor], Any]
_Outputs = tuple[torch.Tensor, torch.Tensor]


def _kernels() -> ModuleType | None:
    """The fused kernels' entry points on layers (``tuco_peft.lora.fused``), or None when Triton cannot be
    imported here."""
    try:
        return importlib.import_module("tuco_peft.lora.fused")
    except ImportError:
        return None


def _loaded_kernels() -> ModuleType:
    """``_kernels()`` where a Triton backend runs: ``resolve_backend`` picks Triton only where they import."""
    kernels = _kernels()
    assert kernels is not None
    return kernels


def resolve_backend(backend: Backend | None, device: torch.device) -> ResolvedBackend:
    """The backend to use for a model on ``device``; ``None`` reads ``TUCO_PEFT_BACKEND`` (default "auto")."""
    source = "backend"
    name: str | None = backend  # the environment variable may hold any string
    if name is None:
        name, source = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower(), BACKEND_ENV_VAR
    if name not in BACKENDS:
        raise InputError(f"{source}={name!r} is not one of {', '.join(map(repr, BACKENDS))}.")
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and _kernels() is not None else "torch"
    kernels = _kernels()
    if kernels is None:
        raise InputError("backend='triton' needs Triton: pip install 'tuco-peft[triton]', or use backend='torch'.")
    if device.type != "cuda" and not kernels.INTERPRETING:
        raise InputError(
            f"backend='triton' on {device.type} needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "triton is first imported, or use backend='torch'."
        )
    return "triton"


def _capture_base_output(
    layer: LoraModule, run: Callable[[], torch.Tensor], copied: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``run`` (a forward of ``layer``) and return (its base layer's output, the layer's output);
    ``copied``: a copy of the base output, which the layer's forward changes in place (a mixed batch's)."""
    captured: list[torch.Tensor] = []
    with hooked(layer.get_base_layer(), after=lambda module, args, output: captured.append(_kept(output, copied))):
        output = run()
    return captured[-1], output


def _kept(output: torch.Tensor, copied: bool) -> torch.Tensor:
    return output.clone() if copied else output


class LoraLinearBackend(ABC):
    """Computes a LoRA linear's pre-trained and fine-tuned outputs together: one subclass per implementation,
    so that callers never branch on which one runs."""

    name: ClassVar[ResolvedBackend]
    # Whether an all-position analysis (a prefill, compute-bound) pairs its blocks. Pairing stacks a block's
    # activations twice; that pays where one kernel decodes each weight tile once for both halves, not where
    # a matmul would read the weight at full speed anyway.
    pairs_prefill: ClassVar[bool]

    @abstractmethod
    def dual(self, x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(layer.base_layer(x), layer(x))``: ``layer`` a plain LoRA linear, or on the torch backend any tuner
        layer whose forward computes its base output first (``kinds.BaseOutput.CAPTURED``)."""

    @abstractmethod
    def two_stream(self, x_pt: torch.Tensor, x_ft: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(layer.base_layer(x_pt), layer(x_ft))``."""

    def stacked(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """A paired block's input ``[x_pt; x_ft]`` (halves along the batch) → ``[base(x_pt); layer(x_ft)]``."""
        half = x.shape[0] // 2
        return torch.cat(self.two_stream(x[:half], x[half:], layer))

    @abstractmethod
    def fuses(self, layer: nn.Module) -> TypeGuard[LoraModule]:
        """Whether ``report_base_outputs`` computes ``layer``'s base output with its output (``dual``) rather
        than reading it from a forward hook (only ever for a PEFT LoRA linear)."""

    @contextmanager
    def report_base_outputs(
        self, layers: Iterable[nn.Module], on_base_output: BaseOutputSink, *, copied: bool = False
    ) -> Iterator[None]:
        """While active, every forward of ``layers`` reports its base output as ``on_base_output(base, args, y)``.

        A layer this backend ``fuses`` computes its base and fine-tuned outputs with ``dual`` and returns the
        fine-tuned one. Every other layer (plain layers, and all of them on the torch backend) reports through
        a forward hook on the module that computes its pre-trained projection, or, for a tuner layer whose
        forward does not call its base layer on its own input (``kinds.BaseOutput.RECOMPUTED``), by one more
        call of that layer with its adapters off. ``copied``: report copies, for forwards that add their
        adapters into the base output in place (PEFT's, on a batch that mixes adapters; AdaLoRA's always).
        """
        with ExitStack() as stack:
            for layer in layers:
                if self.fuses(layer):
                    stack.enter_context(replaced_forward(layer, self._fused_forward(layer, on_base_output, copied)))
                    continue
                kind = adapter_kind(layer)
                if kind is not None and not kind.captured:
                    reporting = _reporting_off_forward(layer, on_base_output)
                    stack.enter_context(hooked(layer, after=reporting, with_kwargs=True))
                else:
                    copy = copied or (kind is not None and kind.adds_in_place)
                    report = (lambda m, args, y: on_base_output(m, args, y.clone())) if copy else on_base_output
                    stack.enter_context(hooked(pretrained_projection(layer), after=report))
            yield

    def _fused_forward(
        self, layer: LoraModule, on_base_output: BaseOutputSink, copied: bool
    ) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs:  # a mixed batch's adapter_names among them
                run = partial(type(layer).forward, layer, x, *args, **kwargs)
                y_base, y_ft = _capture_base_output(layer, run, copied)
            else:
                y_base, y_ft = self.dual(x, layer)
            on_base_output(layer.get_base_layer(), (x,), y_base)
            return y_ft

        return forward


def _reporting_off_forward(layer: nn.Module, on_base_output: BaseOutputSink) -> Callable[..., None]:
    """A forward hook of ``layer`` that reports its output with its adapters off, on the same inputs."""
    base_layer = pretrained_projection(layer)

    def report(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> None:
        with adapters_disabled(layer.modules()):  # with the tuner layers nested in it (mixed models)
            on_base_output(base_layer, args, type(layer).forward(layer, *args, **kwargs))

    return report


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _base_layer_callable_once(layer: LoraModule) -> bool:
    """Whether ``layer``'s base layer may compute its output outside PEFT's forward: nothing observes or
    replaced it (a hook must see each call as it would unpaired) and it is not itself a tuner layer."""
    base_layer = layer.base_layer
    return base_layer is layer.get_base_layer() and not forward_replaced(base_layer) and not module_hooked(base_layer)


def _peft_forward_given_base_output(layer: LoraModule, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` by PEFT's own forward, its base layer's output already computed: the LoRA arithmetic
    (casts, scalings, dropout, variants, lora_A hooks such as the lean cache's) stays PEFT's."""
    with replaced_forward(layer.base_layer, lambda *args, **kwargs: base_output):
        return type(layer).forward(layer, x)


class _PlainLora(NamedTuple):
    """A LoRA linear whose forward is ``base(x)`` plus ``B(A(x))·scaling`` per active adapter, read for one call.

    ``base``, ``finetuned`` and ``stacked`` run the operations PEFT's forward runs, in its order (the same bits
    on the same rows), each linear by its class's forward, without PEFT's per-call Python or the module calls'
    machinery: in a small call those cost more than the arithmetic of a small projection.
    """

    base_layer: nn.Linear
    terms: list[tuple[nn.Linear, nn.Linear, float]]  # (A, B, scaling) of each active adapter, in PEFT's order

    @classmethod
    def of(cls, layer: nn.Module, x: torch.Tensor) -> _PlainLora | None:
        """``layer`` so read where that is exactly its forward on ``x``: a ``lora.Linear`` (not a subclass) over
        an ``nn.Linear``, its adapters on and unmerged, none a variant (DoRA), dropout that passes ``x``
        through, every dtype ``x``'s (PEFT would cast), and no hook or instance forward on the layers whose
        calls it skips (the lean KV cache hooks ``lora_A``), nor any global module hook. None otherwise.

        Read from the module dictionaries: ``nn.Module.__getattr__`` would cost more than the checks.
        """
        if type(layer) is not LoraLinear or layer.disable_adapters or layer.merged_adapters or _global_hooks():
            return None
        base = layer._modules["base_layer"]
        if type(base) is not nn.Linear or not _plain_call(base, x):
            return None
        lora_a, lora_b, dropouts = layer.lora_A._modules, layer.lora_B._modules, layer.lora_dropout._modules
        terms = []
        for name in layer.active_adapters:
            a = lora_a.get(name)
            if a is None:  # PEFT's forward skips an active name this layer holds no adapter of
                continue
            b, dropout = lora_b[name], dropouts[name]
            passes_through = type(dropout) is nn.Identity or (
                type(dropout) is nn.Dropout and not (dropout.training and dropout.p > 0)
            )
            if (
                name in layer.lora_variant
                or not (passes_through and _unobserved(dropout))
                or type(a) is not nn.Linear
                or type(b) is not nn.Linear
                or not (_plain_call(a, x) and _plain_call(b, x))
            ):
                return None
            terms.append((a, b, layer.scaling[name]))
        return cls(base, terms)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear.forward(self.base_layer, x)

    def finetuned(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        result = base_output
        for term in self._terms(x):
            result = result + term
        return result

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """``[base(x_pt); layer(x_ft)]`` of a paired block's input ``[x_pt; x_ft]``, the terms added in place into
        the base output's second half: no copy of the halves into a new tensor (each a few microseconds in a
        small call). Differentiable: the base matmul does not keep its output for backward."""
        both = self.base(x)
        half = x.shape[0] // 2
        finetuned = both[half:]
        for term in self._terms(x[half:]):
            finetuned += term
        return both

    def _terms(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """``B(A(x))·scaling`` of each active adapter, in PEFT's order."""
        for a, b, scaling in self.terms:
            yield nn.Linear.forward(b, nn.Linear.forward(a, x)) * scaling


def _unobserved(module: nn.Module) -> bool:
    """No hook of its own (forward or backward) and no instance forward: calling the class's forward is calling
    the module, where no global hook is set either (``_global_hooks``)."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
    )


def _global_hooks() -> bool:
    """Whether hooks registered for every module are set (``torch.nn.modules.module.register_module_*_hook``:
    module trackers, FLOP counters)."""
    return bool(
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    )


def _plain_call(linear: nn.Linear, x: torch.Tensor) -> bool:
    """``linear`` may be called by its class's forward on ``x`` as PEFT's forward would call it: unobserved, and
    its weight of ``x``'s dtype (where PEFT would cast ``x`` first)."""
    return _unobserved(linear) and linear.weight.dtype == x.dtype


class TorchBackend(LoraLinearBackend):
    """PEFT's own forwards: the reference path, and where the kernels can't compute a layer. Each base
    layer is called once for both outputs, so a paired block reads every base weight once per step."""

    name = "torch"
    pairs_prefill = False

    def dual(self, x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        plain = _PlainLora.of(layer, x)
        if plain is not None:
            base_output = plain.base(x)
            return base_output, plain.finetuned(x, base_output)
        layer = cast("LoraModule", layer)  # a tuner layer whose forward computes its base output first
        kind = adapter_kind(layer)
        in_place = kind is not None and kind.adds_in_place  # its forward would change the returned base output
        if not _base_layer_callable_once(layer):
            return _capture_base_output(layer, lambda: type(layer).forward(layer, x), copied=in_place)
        base_output = layer.base_layer(x)
        given = base_output.clone() if in_place else base_output
        return base_output, _peft_forward_given_base_output(layer, x, given)

    def two_stream(self, x_pt: torch.Tensor, x_ft: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """One call of the base layer on the rows of both streams stacked."""
        layer = cast("LoraModule", layer)  # a PEFT LoRA linear, as every layer a backend computes
        if not _base_layer_callable_once(layer):
            return layer.base_layer(x_pt), type(layer).forward(layer, x_ft)
        plain = _PlainLora.of(layer, x_ft)
        rows_pt, rows_ft = _rows(x_pt), _rows(x_ft)
        both = torch.cat([rows_pt, rows_ft])
        base_pt, base_ft = (layer.base_layer(both) if plain is None else plain.base(both)).split(
            [len(rows_pt), len(rows_ft)]
        )
        base_pt, base_ft = base_pt.reshape(*x_pt.shape[:-1], -1), base_ft.reshape(*x_ft.shape[:-1], -1)
        if plain is not None:
            return base_pt, plain.finetuned(x_ft, base_ft)
        return base_pt, _peft_forward_given_base_output(layer, x_ft, base_ft)

    def stacked(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """One call of the base layer on the stacked input as it comes (no copy of its two halves)."""
        plain = _PlainLora.of(layer, x)
        if plain is not None:
            return plain.stacked(x)
        layer = cast("LoraModule", layer)  # a PEFT LoRA linear, as every layer a backend computes
        if not _base_layer_callable_once(layer):
            return super().stacked(x, layer)
        half = x.shape[0] // 2
        base_output = layer.base_layer(x)
        return torch.cat([base_output[:half], _peft_forward_given_base_output(layer, x[half:], base_output[half:])])

    def fuses(self, layer: nn.Module) -> TypeGuard[LoraModule]:
        return False


class TritonBackend(LoraLinearBackend):
    """The fused kernels (``tuco_peft.lora.fused``); per layer, the torch path where they can't run."""

    name = "triton"
    pairs_prefill = True

    def __init__(self) -> None:
        self._fallback = TorchBackend()
        self._warned: set[str] = set()

    def dual(self, x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fused_or_fallback(
            lambda: _loaded_kernels().dual_lora_linear(x, layer), lambda: self._fallback.dual(x, layer)
        )

    def two_stream(self, x_pt: torch.Tensor, x_ft: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fused_or_fallback(
            lambda: _loaded_kernels().two_stream_lora_linear(x_pt, x_ft, layer),
            lambda: self._fallback.two_stream(x_pt, x_ft, layer),
        )

    def fuses(self, layer: nn.Module) -> TypeGuard[LoraModule]:
        """A PEFT LoRA linear whose forward is not replaced on the instance (accelerate's device hooks), which
        is left alone."""
        return is_additive_lora(layer) and not forward_replaced(layer)

    def _fused_or_fallback(self, fused: Callable[[], _Outputs], fallback: Callable[[], _Outputs]) -> _Outputs:
        try:
            return fused()
        except UnsupportedModelError as error:
            reason = str(error)
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(
                    f"tuco-peft: using the torch path where the Triton kernels can't run: {reason}", stacklevel=4
                )
        return fallback()


BACKEND_CLASSES: dict[ResolvedBackend, type[LoraLinearBackend]] = {
    backend.name: backend for backend in (TorchBackend, TritonBackend)
}


def make_backend(name: ResolvedBackend) -> LoraLinearBackend:
    """The backend called ``name``, as ``resolve_backend`` returns it."""
    return BACKEND_CLASSES[name]()
