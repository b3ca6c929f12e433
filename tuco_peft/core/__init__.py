"""The decomposition: TuCo of a LoRA/QLoRA model in one forward pass (Nuti et al., ICML 2025, Alg. 1).

The API (``decompose``, ``tuco``, and ``many_adapters``: one decomposition per adapter a model holds), its
result types (``contributions``), the pre-trained path of a block evaluated on the fine-tuned hidden states
(``pretrained_path``), both paths of a block in one stacked forward (``paired``) and the paper's two-pass
method kept as a baseline (``baselines``). It imports from ``views`` and below.
"""
