"""TuCo inside other tools: a ``transformers.Trainer`` callback (``callback``), steered models in
lm-evaluation-harness (``evaluation``) and α chosen by cross-validation (``alpha_sweep``). It imports from
``steering`` and below.
"""
