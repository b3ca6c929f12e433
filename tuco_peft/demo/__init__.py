"""The demo pair: a small base LM pre-trained here and a LoRA chat fine-tune of it, built offline."""

from .build import DemoRecipe, ensure_demo_checkpoints, ensure_demo_run
from .prompts import demo_prompts

__all__ = ["DemoRecipe", "demo_prompts", "ensure_demo_checkpoints", "ensure_demo_run"]
