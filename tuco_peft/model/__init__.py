"""The model layer: what an analysis needs to know about a (PEFT-wrapped) causal LM, and how it steps in.

Finding the decoder blocks and their parts (``parts``), the one walk that lists the modules an analysis
checks and switches (``inventory``), the state a pass changes and puts back (``analysis_state``), every
hook and replaced forward (``interception``), the arguments a block is called with (``block_args``), causal
attention for a few rows (``attention``) and the batch of prompts (``inputs``). It imports only
``tuco_peft.errors`` and ``tuco_peft.families`` (see ``tests/core/test_layers.py`` for the full order).
"""
