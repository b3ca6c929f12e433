"""Load the models of the command line once their checkpoints have passed ``checkpoints``' checks: a base
model and its LoRA adapter, or a fully fine-tuned model and its pre-trained checkpoint, and the tokenizer."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .adapter_series import AdapterCheckpoint
from .checkpoints import LoadOptions, Source, check_checkpoint, check_tokenizer, resolve, tokenizer_source


def _load_failure(source: Source, error: Exception, reason: str = "{}") -> InputError:
    """A failed from_pretrained as one line: a hub id that could not be fetched, or the loader's ``reason``."""
    if source.local is None and isinstance(error, OSError):
        return _hub_failure(source, error)
    return InputError(f"{source.describe()}: {reason.format(first_line(error))}")


def _hub_failure(source: Source, error: Exception) -> InputError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        reason = "the Hugging Face Hub is not reachable in offline mode (HF_HUB_OFFLINE=1)"
    else:
        reason = f"fetching it from the Hugging Face Hub failed ({first_line(error)})"
    return InputError(
        f"{source.describe()} is not a local directory and {reason}; download it where there is network "
        "(hf download ID --local-dir DIR) and pass the directory."
    )

def load_base(source: Source, options: LoadOptions) -> nn.Module:
    """The pre-trained causal LM, in eval mode, on the requested device and dtype."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_checkpoint(source, options)
    kwargs: dict[str, object] = {
        "dtype": options.torch_dtype(),
        "use_safetensors": None if options.trust_pickle else True,
        "trust_remote_code": options.trust_remote_code,
    }
    if options.load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config(options.torch_dtype())
        kwargs["device_map"] = {"": options.torch_device()}
    try:
        # Typed as the nn.Module it is: transformers' @wraps(nn.Module.to) hides ``to``'s self from checkers.
        model: nn.Module = AutoModelForCausalLM.from_pretrained(
            source.location if source.local is None else source.local, **kwargs
        )
    except (OSError, SafetensorError) as error:
        raise _load_failure(source, error) from error
    if not options.load_in_4bit:
        model = model.to(options.torch_device())
    return model.eval()


def _four_bit_config(compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InputError("--load-in-4bit needs bitsandbytes: pip install 'tuco-peft[qlora]'.") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def check_adapter_fits(base: nn.Module, adapter_dir: Path) -> None:
    """Compare the adapter's LoRA matrices with the base's linear layers before PEFT loads them.

    PEFT reports a mismatch as a long state-dict error; this names the first module and both shapes.
    """
    from safetensors import safe_open

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            match = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight$", key)
            if match is not None:
                shapes.setdefault(match[1], {})[match[2]] = tuple(tensors.get_slice(key).get_shape())
    modules = dict(base.named_modules())
    missing = sorted(set(shapes) - set(modules))
    if missing:
        raise InputError(
            f"the adapter has LoRA weights for {missing[0]}, which the base model does not have; "
            "was it trained on another base?"
        )
    for name, module in modules.items():  # in the model's order, so the first mismatch named is the earliest
        expected = {"A": getattr(module, "in_features", None), "B": getattr(module, "out_features", None)}
        found = shapes.get(name, {})
        if "A" in found and expected["A"] is not None and found["A"][1] != expected["A"]:
            raise InputError(
                f"the adapter does not fit this base: {name} takes inputs of size {expected['A']} but the adapter's "
                f"lora_A has shape {found['A']}; load the base model the adapter was trained on."
            )
        if "B" in found and expected["B"] is not None and found["B"][0] != expected["B"]:
            raise InputError(
                f"the adapter does not fit this base: {name} has outputs of size {expected['B']} but the adapter's "
                f"lora_B has shape {found['B']}; load the base model the adapter was trained on."
            )


def _checked_adapter(base: nn.Module, source: Source, options: LoadOptions) -> str:
    """Where PEFT loads the adapter at ``source`` from, once it is checked against ``base`` (the plain model,
    before PEFT renames its modules)."""
    check_checkpoint(source, options, "adapter")
    if source.local is not None and (source.local / "adapter_model.safetensors").is_file():
        check_adapter_fits(base, source.local)
    return source.location if source.local is None else str(source.local)


@contextmanager
def _adapter_load_failures(source: Source) -> Iterator[None]:
    """A failed adapter load as one line naming ``source``."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as error:
        raise _load_failure(source, error) from error


def load_adapter(base: nn.Module, source: Source, options: LoadOptions) -> nn.Module:
    """Wrap ``base`` with the LoRA adapter at ``source``, in eval mode."""
    from peft import PeftModel

    location = _checked_adapter(base, source, options)
    with _adapter_load_failures(source):
        model = PeftModel.from_pretrained(base, location)
    return model.eval()


def load_tokenizer(base: Source, finetune: Source | None, options: LoadOptions):
    """The tokenizer of ``tokenizer_source(base, finetune)``: the fine-tune's when it ships one, else the base's."""
    from transformers import AutoTokenizer

    source = tokenizer_source(base, finetune)
    check_tokenizer(source)
    try:
        return AutoTokenizer.from_pretrained(
            source.location if source.local is None else source.local, trust_remote_code=options.trust_remote_code
        )
    except OSError as error:
        raise _load_failure(source, error, "no usable tokenizer ({}).") from error


def load_pair(base: str, adapter: str, options: LoadOptions) -> tuple[nn.Module, object]:
    """(PeftModel in eval mode, tokenizer) for the command line; each loader checks its own checkpoint (the
    command line has run ``check_pair`` before anything loads)."""
    base_source, adapter_source = resolve(base, "--base"), resolve(adapter, "--adapter")
    tokenizer = load_tokenizer(base_source, adapter_source, options)
    return load_adapter(load_base(base_source, options), adapter_source, options), tokenizer


def load_adapters(
    base: str, adapters: Sequence[AdapterCheckpoint], options: LoadOptions
) -> tuple[nn.Module, object]:
    """(PeftModel in eval mode holding every adapter of ``adapters`` under its ``adapter_name``, the first
    active; tokenizer): a run over several adapters, on one load of ``base``."""
    from peft import PeftModel

    base_source = resolve(base, "--base")
    sources = [resolve(str(adapter.path), "--adapter") for adapter in adapters]
    tokenizer = load_tokenizer(base_source, sources[0], options)  # analyze checks that they all ship the same
    model: nn.Module = load_base(base_source, options)
    locations = [_checked_adapter(model, source, options) for source in sources]
    for index, (adapter, source, location) in enumerate(zip(adapters, sources, locations)):
        with _adapter_load_failures(source):
            if index == 0:
                model = PeftModel.from_pretrained(model, location, adapter_name=adapter.adapter_name)
            else:
                model.load_adapter(location, adapter_name=adapter.adapter_name)  # type: ignore[operator]
    return model.eval(), tokenizer


def streamable_checkpoint(source: Source, options: LoadOptions) -> Path:
    """The local directory of a pre-trained checkpoint's safetensors, which decompose streams block by block
    (fetched from the hub first when ``source`` is a hub id)."""
    check_checkpoint(source, options, "streamed")
    directory = source.local
    if directory is None:
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as error:  # offline, unknown id, no access: all mean "not available here"
            raise _hub_failure(source, error) from error
        check_checkpoint(Source(source.flag, source.location, directory), options, "streamed")
    return directory


def load_full_finetune(
    finetuned: str, pretrained: str, options: LoadOptions, *, resident: bool = False
) -> tuple[nn.Module, nn.Module | Path, object]:
    """(fine-tuned model in eval mode, its pre-trained model, tokenizer) for decompose's ``base_model``.

    The pre-trained model is the directory of its safetensors, streamed one block at a time (one model
    resident), or with ``resident`` a second loaded model (faster, twice the weights in memory). A checkpoint
    of another architecture or size is refused here, before any prompt is analysed.
    """
    from ..model.parts import model_parts
    from .block_sources import checked_pretrained_blocks

    finetuned_source, pretrained_source = resolve(finetuned, "--model"), resolve(pretrained, "--base-model")
    tokenizer = load_tokenizer(pretrained_source, finetuned_source, options)
    model = load_base(finetuned_source, options)
    if resident:
        base_model: nn.Module | Path = load_base(pretrained_source, options)
    else:
        base_model = streamable_checkpoint(pretrained_source, options)
    checked_pretrained_blocks(model_parts(model), base_model)
    return model, base_model, tokenizer
