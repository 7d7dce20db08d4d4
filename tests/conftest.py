"""Shared fixtures: tiny random models (seconds) and the real SmolLM2 (marked ``real_model``)."""

from __future__ import annotations

import pytest

from effinfer.core.registry import get_registry
from effinfer.core.testing import tiny_llama


@pytest.fixture(scope="session")
def registry():
    return get_registry()


@pytest.fixture
def tiny():
    return tiny_llama(layers=2, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny model saved as a folder, usable as a model source string."""
    model, tokenizer = tiny_llama(layers=2, seed=0)
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    from effinfer.core.models import load_model

    return load_model("smollm2-135m-instruct")
