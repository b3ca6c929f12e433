"""The README's support table is the one the registries give (``tuco_peft.apps.support``), and says of each
family and adapter kind what decompose then does."""

from __future__ import annotations

import pytest
from helpers import REPO_ROOT
from helpers.models import FAMILIES, base_model, padded_batch
from helpers.strategies import force, record_strategies
from peft import LoraConfig, OFTConfig, get_peft_model

import tuco_peft
from tuco_peft.apps.support import BEGIN, END, support_table
from tuco_peft.core.pretrained_path import SharedProjectionBlock
from tuco_peft.lora.kinds import registered_adapter_kinds


def test_the_readme_holds_the_table_the_registries_give():
    readme = (REPO_ROOT / "README.md").read_text()
    assert BEGIN in readme and END in readme, "README.md lost the support table's markers"
    written = readme[readme.index(BEGIN) : readme.index(END) + len(END)]
    assert written == support_table(), "README.md's support table is stale: paste `python -m tuco_peft.apps.support`"


def test_every_registered_kind_and_family_has_its_place():
    table = support_table()
    for registered in registered_adapter_kinds():
        assert all(kind.name in table for kind in registered.kinds)
    assert all(f"| `{family}` |" in table for family in FAMILIES)


def _row(model_type: str) -> list[str]:
    line = next(line for line in support_table().splitlines() if line.startswith(f"| `{model_type}` |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.parametrize(
    ("config", "column", "expected"),
    [
        (lambda: LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), 1, SharedProjectionBlock),
        (
            lambda: OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "k_proj", "v_proj"], init_weights=False),
            3,
            SharedProjectionBlock,
        ),
    ],
    ids=["lora", "oft"],
)
def test_a_cell_says_the_path_decompose_takes(config, column, expected, monkeypatch):
    force(monkeypatch, "separate reads")
    chosen = record_strategies(monkeypatch)
    model = get_peft_model(base_model("llama"), config()).eval()
    tuco_peft.tuco(model, *padded_batch())
    cell = _row("llama")[column]
    assert set(chosen) == {expected} and cell.startswith("one pass")
