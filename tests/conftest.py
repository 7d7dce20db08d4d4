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


@pytest.fixture
def needs_bigbench():
    """Skip, with the reason, where the BIG-bench task files cannot be had (PyPI stopped serving
    bigbench 1.0.0 in December 2026; a machine with the tasks in its cache still runs these tests)."""
    from effinfer.data.bigbench import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
