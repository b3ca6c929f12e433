"""The documented home of the lm-evaluation-harness integration, ``tuco_peft.evaluation``: it lives in
``tuco_peft.integrations.evaluation``, with the package's other integrations."""

from .integrations.evaluation import FTCScaledLM, check_task_data, check_tasks, evaluate_alphas, write_report

__all__ = ["FTCScaledLM", "check_task_data", "check_tasks", "evaluate_alphas", "write_report"]
