"""Two tiny local lm-eval tasks (multiple choice and generation) over ten yes/no questions, for offline runs."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["quick", "brown", "lazy", "blue", "red", "old", "small", "green", "dark", "calm"]
_MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "is the fox {{{{word}}}}?\\nAnswer:"
doc_to_choice: ["yes", "no"]
doc_to_target: answer
metric_list:
  - metric: acc
"""
_GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "is the fox {{{{word}}}}?\\nAnswer:"
doc_to_target: "{{{{['yes', 'no'][answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_tasks(root: Path) -> Path:
    """Two lm-eval task YAMLs in ``root``, tiny_mc and tiny_gen, over one JSON-lines file of ten yes/no items."""
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps({"word": w, "answer": i % 2}) + "\n" for i, w in enumerate(WORDS)))
    (root / "tiny_mc.yaml").write_text(_MC_TASK.format(data=data))
    (root / "tiny_gen.yaml").write_text(_GEN_TASK.format(data=data))
    return root
