"""Keys/values that one block computes and later blocks reuse (Gemma 3n, Gemma 4, Kolibri 1.1).

The decoder hands every block one store per forward (``shared_kv_states``): a storing block writes its keys/values
there, a reusing block attends to them instead of computing its own. The pre-trained block of a reusing layer must
attend to the keys/values the *pre-trained* storing block computed from the same fine-tuned state (adapters off
there too), and a pre-trained block must never write into the fine-tuned store, which later fine-tuned blocks read.
So the pre-trained blocks of a forward get a store of their own (``PretrainedStore``), and every pre-trained block of
such a model runs in full (a storing block's keys/values reach its readers only through its own forward).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError

# The keyword under which transformers passes a block the forward's store (5.6 on; 5.5 kept it on the cache).
STORE_ARGUMENT = "shared_kv_states"


def passes_store(layer: nn.Module) -> bool:
    """Whether the decoder hands ``layer`` the forward's store as an argument (where it can be replaced)."""
    return STORE_ARGUMENT in inspect.signature(type(layer).forward).parameters


class PretrainedStore:
    """The pre-trained blocks' store of shared keys/values, a fresh one for every forward of the model.

    A forward is recognised by its fine-tuned store: the decoder makes a new one each time. Both are held until
    the next forward or until this object goes (the end of the analysis or of ``ftc_scale``). Made only for a
    model whose blocks share keys/values, so a block call without the store by keyword is refused (it would
    hand the pre-trained block the fine-tuned store).
    """

    def __init__(self) -> None:
        self._finetuned: Any = None
        self._pretrained: Any = None

    def call_arguments(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A pre-trained block's keyword arguments: the fine-tuned block's, with this forward's pre-trained store."""
        finetuned = kwargs.get(STORE_ARGUMENT)
        if finetuned is None:
            raise UnsupportedModelError(
                f"the decoder called a block without {STORE_ARGUMENT} by keyword, so its pre-trained block could not "
                "be given keys/values of its own and the numbers would be wrong. Report this with your transformers "
                "version."
            )
        if finetuned is not self._finetuned:
            self._finetuned, self._pretrained = finetuned, type(finetuned)()
        return {**kwargs, STORE_ARGUMENT: self._pretrained}
