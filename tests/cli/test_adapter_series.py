"""`--adapter DIR ...` becomes an ordered series of adapters before any model loads: an adapter folder, a
training run's checkpoint-N folders in step order (with the step and training loss they logged), or a folder
of adapters by name; wrong folders are named with the way out. Only small JSON files are written here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tuco_peft.errors import InputError
from tuco_peft.io.adapter_series import AdapterCheckpoint, find_adapters

_CONFIG = {"peft_type": "LORA", "base_model_name_or_path": "base-x", "r": 4}


def _adapter(folder, **config):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({**_CONFIG, **config}))
    return folder


def _checkpoint(run, step, log_history=(), **config):
    folder = _adapter(run / f"checkpoint-{step}", **config)
    state = {"global_step": step, "log_history": list(log_history)}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def _losses(*pairs):
    """A log_history of training losses at steps, as the Trainer logs them every logging_steps."""
    return [{"loss": loss, "step": step, "learning_rate": 1e-4} for step, loss in pairs]


def test_an_adapter_folder_is_one_adapter(tmp_path):
    folder = _adapter(tmp_path / "my-lora")
    assert find_adapters([folder]) == [AdapterCheckpoint("my-lora", folder, None, None)]
    assert find_adapters([str(folder)]) == [AdapterCheckpoint("my-lora", folder, None, None)]


def test_the_current_folder_is_named_after_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(_adapter(tmp_path / "here"))
    (adapter,) = find_adapters(["."])
    assert adapter.name == "here"


def test_a_checkpoint_folder_carries_its_run_step_and_loss(tmp_path):
    history = [
        *_losses((10, 2.5), (20, 1.75)),
        {"eval_loss": 0.5, "step": 20},  # not a training loss
        {"loss": 0.25, "step": 30},  # after the checkpoint (a state copied from a later one)
        {"train_loss": 0.1, "step": 20},  # the Trainer's average over the whole run
    ]
    folder = _checkpoint(tmp_path / "run-a", 20, history)
    assert find_adapters([folder]) == [AdapterCheckpoint("run-a/checkpoint-20", folder, 20, 1.75)]


@pytest.mark.parametrize(
    "history",
    [[], [{"eval_loss": 0.5, "step": 10}], _losses((50, 1.0)), [{"loss": 1.0}], [{"loss": "1.0", "step": 5}]],
)
def test_a_checkpoint_that_logged_no_loss_by_its_step_has_none(tmp_path, history):
    (adapter,) = find_adapters([_checkpoint(tmp_path / "run", 10, history)])
    assert adapter.step == 10 and adapter.train_loss is None


def test_a_run_folder_gives_its_checkpoints_in_step_order(tmp_path):
    run = tmp_path / "run"
    history = _losses((10, 3.0), (30, 2.0), (200, 1.0))
    for step in (200, 10, 30):
        _checkpoint(run, step, [entry for entry in history if entry["step"] <= step])
    (run / "runs").mkdir()  # TensorBoard logs, not an adapter
    (run / "README.md").write_text("trained with TRL")
    adapters = find_adapters([run])
    assert [(a.name, a.path, a.step, a.train_loss) for a in adapters] == [
        ("run/checkpoint-10", run / "checkpoint-10", 10, 3.0),
        ("run/checkpoint-30", run / "checkpoint-30", 30, 2.0),
        ("run/checkpoint-200", run / "checkpoint-200", 200, 1.0),
    ]


def test_a_run_folder_that_is_an_adapter_itself_comes_after_its_checkpoints(tmp_path):
    run = _adapter(tmp_path / "run")  # the Trainer saved the final adapter into its output folder
    _checkpoint(run, 10)
    assert find_adapters([run]) == [
        AdapterCheckpoint("run/checkpoint-10", run / "checkpoint-10", 10, None),
        AdapterCheckpoint("run", run, None, None),
    ]


def test_the_final_adapter_of_a_run_takes_its_step_or_is_left_out_when_it_is_the_last_checkpoint(tmp_path):
    """Trainer.save_model puts the final adapter into the run folder, and save_state its trainer_state.json."""
    run = _adapter(tmp_path / "run")
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 25, "log_history": _losses((20, 1.5))}))
    for step in (10, 20):
        (_checkpoint(run, step) / "adapter_model.safetensors").write_bytes(bytes([step]) * 64)
    (run / "adapter_model.safetensors").write_bytes(bytes([25]) * 64)
    assert find_adapters([run])[-1] == AdapterCheckpoint("run", run, 25, 1.5)
    (run / "adapter_model.safetensors").write_bytes(bytes([20]) * 64)  # the last checkpoint's weights again
    assert [adapter.name for adapter in find_adapters([run])] == ["run/checkpoint-10", "run/checkpoint-20"]


def test_adapters_of_two_kinds_are_refused(tmp_path):
    lora, ia3 = _adapter(tmp_path / "lora"), _adapter(tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(InputError, match=r"ia3 is a IA3 adapter and --adapter .*lora a LORA one"):
        find_adapters([lora, ia3])


def test_names_with_a_dot_become_peft_adapter_names_without(tmp_path):
    adapter = _adapter(tmp_path / "qwen2.5-sft")
    (found,) = find_adapters([adapter])
    assert found.name == "qwen2.5-sft" and found.adapter_name == "tuco:qwen2_5-sft"
    _adapter(tmp_path / "more" / "qwen2_5-sft")
    with pytest.raises(InputError, match="would both be named 'qwen2_5-sft'"):
        find_adapters([adapter, tmp_path / "more" / "qwen2_5-sft"])


def test_a_folder_of_adapters_is_taken_by_name(tmp_path):
    folder = tmp_path / "adapters"
    for name in ("math", "code", "chat"):
        _adapter(folder / name)
    (folder / "notes").mkdir()
    (folder / "notes" / "config.json").write_text("{}")
    (folder / "adapter_model.safetensors.bak").write_text("")
    adapters = find_adapters([folder])
    assert adapters == [AdapterCheckpoint(name, folder / name) for name in ("chat", "code", "math")]


def test_locations_keep_their_order(tmp_path):
    single = _adapter(tmp_path / "zz-final")
    run = tmp_path / "run"
    _checkpoint(run, 20)
    _checkpoint(run, 5)
    collection = tmp_path / "collection"
    _adapter(collection / "b")
    _adapter(collection / "a")
    names = [adapter.name for adapter in find_adapters([single, collection, run])]
    assert names == ["zz-final", "a", "b", "run/checkpoint-5", "run/checkpoint-20"]


def test_a_location_given_twice_is_refused(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 5)
    with pytest.raises(InputError, match="would both be named 'run/checkpoint-5'") as error:
        find_adapters([run, run / "checkpoint-5"])
    assert str(error.value).count(str(run / "checkpoint-5")) == 2 and "pass only one of them" in str(error.value)


def test_two_adapters_with_one_name_are_refused(tmp_path):
    first, second = _adapter(tmp_path / "x" / "lora"), _adapter(tmp_path / "y" / "lora")
    with pytest.raises(InputError, match="would both be named 'lora'") as error:
        find_adapters([first, second])
    assert f"--adapter {first} and --adapter {second}" in str(error.value)
    assert "rename one folder" in str(error.value)


@pytest.mark.parametrize("location", ["no-such-folder", "org/some-lora"])
def test_a_location_that_is_not_a_local_folder_is_refused(tmp_path, monkeypatch, location):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=f"--adapter {location}: no such local folder") as error:
        find_adapters([location])
    assert "not the Hub" in str(error.value) and "hf download ID --local-dir DIR" in str(error.value)


def test_a_file_is_refused(tmp_path):
    path = _adapter(tmp_path / "lora") / "adapter_config.json"
    with pytest.raises(InputError, match=re.escape(f"--adapter {path} is a file; pass the adapter's folder")):
        find_adapters([path])


def test_a_folder_without_adapters_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model").mkdir()
    (empty / "model" / "config.json").write_text("{}")
    with pytest.raises(InputError, match=re.escape(f"--adapter {empty} holds no PEFT adapter")):
        find_adapters([empty])


def test_a_checkpoint_that_is_not_an_adapter_is_refused(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 10)
    (run / "checkpoint-20").mkdir()  # a full fine-tune's checkpoint, or one being written
    with pytest.raises(InputError, match=re.escape(f"{run / 'checkpoint-20'} is not a PEFT adapter")):
        find_adapters([run])


@pytest.mark.parametrize("as_run", [False, True])
def test_a_checkpoint_without_trainer_state_is_refused(tmp_path, as_run):
    run = tmp_path / "run"
    folder = _checkpoint(run, 10)
    (folder / "trainer_state.json").unlink()
    with pytest.raises(
        InputError, match=re.escape(f"{folder} is a training checkpoint without trainer_state.json")
    ) as error:
        find_adapters([run if as_run else folder])
    assert "restore the file" in str(error.value) and "folder not named checkpoint-N" in str(error.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"global_step": 10,', "is not valid JSON"),
        ("[10]", "is not a JSON object"),
        ('{"log_history": []}', "has no integer global_step"),
        ('{"global_step": "10"}', "has no integer global_step"),
    ],
)
def test_an_unreadable_trainer_state_is_refused(tmp_path, content, problem):
    folder = _checkpoint(tmp_path / "run", 10)
    (folder / "trainer_state.json").write_text(content)
    with pytest.raises(InputError, match=re.escape(f"{folder / 'trainer_state.json'} {problem}")) as error:
        find_adapters([folder])
    assert "restore it from the training run" in str(error.value)


@pytest.mark.parametrize("as_run", [False, True])
def test_a_checkpoint_named_for_another_step_is_refused(tmp_path, as_run):
    run = tmp_path / "run"
    folder = _checkpoint(run, 10)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 12, "log_history": []}))
    with pytest.raises(InputError, match="is named for step 10 but its trainer_state.json says global_step 12"):
        find_adapters([run if as_run else folder])


def test_an_adapter_config_that_is_not_json_is_refused(tmp_path):
    folder = _adapter(tmp_path / "lora")
    (folder / "adapter_config.json").write_text("{'r': 4}")
    with pytest.raises(
        InputError, match=re.escape(f"{folder / 'adapter_config.json'} is not valid JSON") + ".*save the adapter"
    ):
        find_adapters([folder])


def test_an_adapter_for_another_base_is_refused(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 10)
    _checkpoint(run, 20, base_model_name_or_path="base-y")
    assert len(find_adapters([run])) == 2  # no base given: not compared
    with pytest.raises(InputError, match="trained on 'base-x', not on --base 'base-y'") as error:
        find_adapters([run], base="base-y")
    assert str(run / "checkpoint-10" / "adapter_config.json") in str(error.value)
    assert "pass the base the adapter was trained on" in str(error.value)


def test_an_adapter_that_names_no_base_or_the_same_base_is_accepted(tmp_path):
    unnamed = _adapter(tmp_path / "unnamed", base_model_name_or_path=None)
    same = _adapter(tmp_path / "same")
    assert len(find_adapters([unnamed, same], base="base-x")) == 2
    assert len(find_adapters([unnamed, same], base="./base-x/")) == 2


def test_local_bases_are_compared_as_folders(tmp_path, monkeypatch):
    base, other = tmp_path / "models" / "base", tmp_path / "models" / "other"
    base.mkdir(parents=True)
    other.mkdir()
    adapter = _adapter(tmp_path / "lora", base_model_name_or_path=str(base))
    monkeypatch.chdir(tmp_path / "models")
    for same in ("base", "./base/", str(other / ".." / "base"), "../models/base"):
        assert len(find_adapters([adapter], base=same)) == 1, same
    with pytest.raises(InputError, match=re.escape(f"trained on '{base}', not on --base 'other'")):
        find_adapters([adapter], base="other")


def test_a_folder_and_a_hub_id_are_left_to_the_shape_check(tmp_path, monkeypatch):
    """A local download of a Hub model, or a path on the machine that trained the adapter, may be its base:
    the names cannot tell, the shapes will when the adapter loads."""
    hub_named = _adapter(tmp_path / "hub-named", base_model_name_or_path="org/base-x")
    path_named = _adapter(tmp_path / "path-named", base_model_name_or_path="/cluster/models/base-x")
    (tmp_path / "local-base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert len(find_adapters([hub_named], base="local-base")) == 1
    assert len(find_adapters([path_named], base="org/base-x")) == 1
    with pytest.raises(InputError, match="trained on 'org/base-x', not on --base 'org/base-y'"):
        find_adapters([hub_named], base="org/base-y")


def test_importing_it_imports_no_torch():
    code = "import sys, tuco_peft.io.adapter_series; print([n for n in ('torch', 'transformers') if n in sys.modules])"
    run = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert run.stdout.strip() == "[]", run.stdout + run.stderr
