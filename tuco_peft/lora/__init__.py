"""The LoRA layer: PEFT's adapter layers read as tensors, and the two ways of computing their outputs.

What each PEFT tuner layer's forward does with its base layer, as data (``kinds``), which adapters decompose
exactly and how they are switched off (``adapters``), the backend that computes a LoRA linear with and
without its adapters (``backend``: plain PyTorch or the fused Triton kernels), a PEFT layer read as the
kernels' tensors (``tensors``) and the kernels' entry points on layers (``fused``). It imports from ``model``
and below, and from ``tuco_peft.kernels``.
"""
