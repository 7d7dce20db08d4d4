"""Model sources: clear errors for missing or corrupt files; a third-party technique runs."""

from __future__ import annotations

import pytest

from effinfer.core.errors import ModelSourceError
from effinfer.core.experiment import Experiment
from effinfer.core.models import load_model
from effinfer.core.runner import run_experiment


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_model(str(tmp_path / "absent.gguf"))


def test_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelSourceError, match="is not a GGUF file .bad magic bytes.; re-download it"):
        load_model(str(fake))


def test_truncated_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFINFER_CACHE", str(tmp_path / "cache"))
    truncated = tmp_path / "model.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(ModelSourceError, match="could not read GGUF file .* truncated or corrupt"):
        load_model(str(truncated))


def test_folder_without_a_model(tmp_path):
    with pytest.raises(ModelSourceError, match="could not load the model in"):
        load_model(str(tmp_path))


def test_unknown_hub_id_suggests_aliases(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="did you mean: smollm2-135m-instruct"):
        load_model("smollm2-135m-instruc")


def test_bad_dtype():
    with pytest.raises(ModelSourceError, match="choose one of float32, bfloat16, float16"):
        load_model("smollm2-135m-instruct", dtype="float64")


def test_local_folder_loads(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert model.config.num_hidden_layers == 2 and tokenizer.eos_token == "<|im_end|>"


def test_third_party_technique_runs_in_an_experiment(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    experiment = Experiment(model=str(tiny_model_dir), techniques=["drop_layers:drop=1,keep_last=false"],
                            prompts=["hello"], generation={"max_new_tokens": 4})
    run = run_experiment(experiment, model=model, tokenizer=tokenizer)
    assert run.report.entries == [("model", "drop_layers", "dropped 1 of 2 decoder layers")]
    assert len(run.completions[0].tokens) >= 1
    assert len(model.model.layers) == 2  # restored after the experiment
