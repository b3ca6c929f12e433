"""FTC_α-steered lm-evaluation-harness runs: a local multiple-choice and a generation task on tiny models."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from helpers.lm_eval_tasks import WORDS, write_tasks
from helpers.models import family_config, lora_model
from transformers import AutoModelForCausalLM

from tuco_peft.demo.build import build_tokenizer
from tuco_peft.errors import InputError, TuCoError

lm_eval = pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")
from lm_eval.tasks import TaskManager

from tuco_peft.integrations.evaluation import FTCScaledLM, check_task_data, evaluate_alphas, write_report

pytestmark = pytest.mark.slow  # lm-eval builds its task index (seconds) per run


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = build_tokenizer([f"is the fox {w}? answer: yes no" for w in WORDS] * 4, vocab_size=200)
    config = family_config("llama")
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return lora_model(base), tokenizer


@pytest.fixture(autouse=True)
def offline_datasets(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _own_run(lm, task_dir, tasks):
    """lm-eval's own evaluation of ``lm`` (no tuco-peft in the loop), with per-item samples."""
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)


def _responses(output, task):
    return [(s["doc_id"], s["filtered_resps"]) for s in output["samples"][task]]


@pytest.fixture(scope="module")
def report(model_and_tokenizer, task_dir):
    model, tokenizer = model_and_tokenizer
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        return evaluate_alphas(
            model, tokenizer, ["tiny_mc", "tiny_gen"], [0.0, 1.0, 1.5], include_path=task_dir, cv_folds=5,
            progress=False, batch_size=4, bootstrap_iters=0,
        )


def test_alpha_one_and_zero_are_lm_evals_own_results(model_and_tokenizer, task_dir, report):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = model_and_tokenizer
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    finetuned = _own_run(plain, task_dir, ["tiny_mc", "tiny_gen"])
    with model.disable_adapter():
        pretrained = _own_run(plain, task_dir, ["tiny_mc", "tiny_gen"])
    assert report["alphas"]["1.0"]["results"] == finetuned["results"]
    assert report["alphas"]["0.0"]["results"] == pretrained["results"]
    for alpha, own in ((1.0, finetuned), (0.0, pretrained)):
        steered = _own_run(FTCScaledLM(model, tokenizer, alpha, batch_size=4), task_dir, ["tiny_mc", "tiny_gen"])
        for task in ("tiny_mc", "tiny_gen"):
            assert _responses(steered, task) == _responses(own, task), (alpha, task)
    steered = _own_run(FTCScaledLM(model, tokenizer, 1.5, batch_size=4), task_dir, ["tiny_mc"])
    assert _responses(steered, "tiny_mc") != _responses(finetuned, "tiny_mc")  # α steers the log-likelihoods


def test_cross_validation_report(report, tmp_path):
    assert set(report["alphas"]) == {"0.0", "1.0", "1.5"}
    assert "samples" not in report["alphas"]["1.0"]
    cv = report["cross_validation"]
    assert set(cv) == {"tiny_mc", "tiny_gen"}
    mc = cv["tiny_mc"]
    assert mc["metric"] == "acc,none" and mc["n_items"] == len(WORDS)
    assert mc["score"]["1.0"] == report["alphas"]["1.0"]["results"]["tiny_mc"]["acc,none"]
    assert len(mc["fold_alphas"]) == 5 and set(mc["fold_alphas"]) <= {0.0, 1.0, 1.5}
    assert mc["baseline_score"] == mc["score"]["1.0"]
    assert mc["cv_gain"] == pytest.approx(mc["cv_score"] - mc["baseline_score"])
    assert cv["tiny_gen"]["metric"] == "exact_match,none"
    written = json.loads(write_report(report, tmp_path / "results.json").read_text())
    assert written["cross_validation"]["tiny_mc"]["cv_gain"] == pytest.approx(mc["cv_gain"])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(tasks=["no_such_task_xyz"]), "unknown lm-eval task 'no_such_task_xyz'"),
        (dict(alphas=[1.0, -0.5]), "alpha[1] = -0.5"),
        (dict(alphas=[1.0, float("nan")]), "must be finite"),
        (dict(alphas=[0.5, 1.5], cv_folds=5), "must include 1.0"),
        (dict(include_path="/no/such/folder"), "is not a folder"),
    ],
)
def test_bad_input_is_one_line(model_and_tokenizer, task_dir, kwargs, fragment):
    model, tokenizer = model_and_tokenizer
    arguments = dict(tasks=["tiny_mc"], alphas=[1.0], include_path=task_dir, progress=False) | kwargs
    with pytest.raises(InputError) as error:
        evaluate_alphas(model, tokenizer, **arguments)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_task_whose_local_data_is_missing_is_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "missing.jsonl"
    (tmp_path / "lost.yaml").write_text(
        f"task: lost\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {missing}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{word}}"\ndoc_to_choice: ["yes", "no"]\ndoc_to_target: answer\n'
    )
    with pytest.raises(InputError) as error:
        check_task_data(["lost"], TaskManager(include_path=str(tmp_path), include_defaults=False))
    assert str(error.value).startswith("lm-eval task 'lost': its data set could not be loaded (")
    assert str(missing) in str(error.value) and "\n" not in str(error.value)


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "tuco_peft.evaluation", raising=False)
    monkeypatch.delitem(sys.modules, "tuco_peft.integrations.evaluation", raising=False)
    with pytest.raises(TuCoError, match=r"pip install 'tuco-peft\[eval\]'"):
        importlib.import_module("tuco_peft.evaluation")


def test_a_hybrid_decoders_log_likelihoods_are_steered_without_a_cache(task_dir):
    """Qwen3-Next (linear-attention blocks beside attention ones): its cache cannot be steered, and a scoring
    forward needs none; at α = 1 the steered scores are lm-eval's own."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoConfig

    tokenizer = build_tokenizer([f"is the fox {w}? answer: yes no" for w in WORDS] * 4, vocab_size=200)
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=0)
    torch.manual_seed(0)
    model = lora_model(AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_next", **shape)).eval(),
                       target_modules=["q_proj", "v_proj", "in_proj_qkvz"])
    own = _own_run(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), task_dir, ["tiny_mc"])
    steered = _own_run(FTCScaledLM(model, tokenizer, 1.0, batch_size=4), task_dir, ["tiny_mc"])
    assert _responses(steered, "tiny_mc") == _responses(own, "tiny_mc")
    moved = _own_run(FTCScaledLM(model, tokenizer, 1.5, batch_size=4), task_dir, ["tiny_mc"])
    assert _responses(moved, "tiny_mc") != _responses(own, "tiny_mc")
