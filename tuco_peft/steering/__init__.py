"""FTC_α steering (Nuti et al., ICML 2025, Def. 5.1): a forward with each block's fine-tuning scaled.

The steered forward and ``ftc_scale`` (``forward``), cached generation with TuCo per new token
(``generation``) and the lean cache that stores fine-tuned keys and values as a low-rank delta
(``lean_cache``). It imports from ``core`` and below.
"""
