"""The files layer: checkpoints, prompts and results on disk, read and written safely.

Checking and loading checkpoints (``loading``), the pre-trained blocks of a decomposition, resident or
streamed from safetensors (``block_sources``), prompt files (``prompts``), JSONL results that resume
(``results``), locks and atomic writes (``locking``), fingerprints of what produced a row (``fingerprint``)
and the adapters of ``--adapter DIR ...``, a training run's checkpoints among them (``adapter_series``).
It imports from ``lora`` and below; it knows nothing of the decomposition itself.
"""
