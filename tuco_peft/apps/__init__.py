"""What the command line and the demo run: many prompts through ``decompose`` (``runner``), across
processes (``distributed``), timed against the paper's method (``benchmark``), summarised (``statistics``)
and drawn (``plotting``). It imports from ``integrations`` and below.
"""
