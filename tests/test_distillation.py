"""Knowledge distillation: loss terms, the layer-drop student, training lowers KL, bad configs, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from effinfer.core.stages import ModelStage, ModulePatcher
from effinfer.core.testing import TINY_FAMILIES, tiny_llama, tiny_model
from effinfer.plugins.model.distillation.common import probe, trainable
from effinfer.plugins.model.distillation.losses import forward_kl, hidden_mse, reverse_kl
from effinfer.plugins.model.distillation.student import StudentError, build_student, choose_dropped, kept_blocks
from effinfer.plugins.model.distillation.white_box import WhiteBoxDistillation
from effinfer.plugins.model.training import train

logits_pairs = st.tuples(st.integers(1, 4), st.integers(2, 6), st.integers(0, 10_000),
                         st.floats(0.5, 3.0))


def textbook_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float) -> float:
    """KL(p ‖ q) = Σ_x p(x) log(p(x)/q(x)), averaged over positions, times τ² — written out by hand."""
    total = 0.0
    for row_p, row_q in zip(p_logits.double().tolist(), q_logits.double().tolist()):
        zp = sum(math.exp(v / tau) for v in row_p)
        zq = sum(math.exp(v / tau) for v in row_q)
        for a, b in zip(row_p, row_q):
            p, q = math.exp(a / tau) / zp, math.exp(b / tau) / zq
            total += p * math.log(p / q)
    return tau ** 2 * total / len(p_logits)


@settings(max_examples=25, deadline=None)
@given(logits_pairs)
def test_kl_terms_are_the_textbook_definitions(shape):
    positions, vocab, seed, tau = shape
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(positions, vocab, generator=generator) * 3
    teacher = torch.randn(positions, vocab, generator=generator) * 3
    assert float(forward_kl(student, teacher, tau)) == pytest.approx(textbook_kl(teacher, student, tau), rel=1e-4,
                                                                     abs=1e-5)
    assert float(reverse_kl(student, teacher, tau)) == pytest.approx(textbook_kl(student, teacher, tau), rel=1e-4,
                                                                     abs=1e-5)
    assert float(forward_kl(teacher, teacher, tau)) == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 8), st.integers(0, 1000))
def test_hidden_mse_is_the_mean_squared_difference(pairs, positions, width, seed):
    generator = torch.Generator().manual_seed(seed)
    a = [torch.randn(positions, width, generator=generator) for _ in range(pairs)]
    b = [torch.randn(positions, width, generator=generator) for _ in range(pairs)]
    expected = sum(sum((x - y) ** 2 for x, y in zip(s.flatten().tolist(), t.flatten().tolist())) / (positions * width)
                   for s, t in zip(a, b)) / pairs
    assert float(hidden_mse(a, b)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="matched"):
        hidden_mse(a, b[:-1] if pairs > 1 else [])


def test_students_drop_the_chosen_blocks():
    assert choose_dropped(10, 3, "uniform") == [2, 5, 7]
    assert choose_dropped(6, 2, "block_influence", [9, 0.1, 0.5, 0.2, 0.3, 9]) == [1, 3]
    with pytest.raises(StudentError, match="drop ≤ 4"):
        choose_dropped(6, 5, "uniform")
    teacher, _ = tiny_llama(layers=4, seed=0)
    student, dropped = build_student(teacher, 1, "uniform")
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in student.model.layers] == [0, 1, 2]
    assert kept_blocks(4, dropped) == [i for i in range(4) if i not in dropped]


def test_white_box_kd_lowers_the_students_kl_to_the_teacher():
    torch.manual_seed(0)
    teacher, _ = tiny_llama(layers=4, seed=0)
    student, dropped = build_student(teacher, 2, "uniform")
    kept = kept_blocks(4, dropped)
    technique = WhiteBoxDistillation({"drop": 2, "forward_kl": 1.0, "reverse_kl": 0.5, "hidden_mse": 0.1})
    held_out = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(1))
    before = probe(student, teacher, held_out)["kl"]
    generator = torch.Generator().manual_seed(2)
    batches = iter(lambda: torch.randint(3, 259, (4, 32), generator=generator), None)
    cost = train(trainable(student, "blocks"), lambda ids: technique.loss(student, teacher, kept, ids), batches, 30,
                 lr=5e-3, progress=False)
    after = probe(student, teacher, held_out)["kl"]
    assert after < 0.9 * before, (before, after)
    assert cost.steps == 30 and cost.tokens == 30 * 4 * 32 and cost.seconds > 0


def test_training_checkpoint_is_reused(tmp_path):
    weight = torch.nn.Parameter(torch.zeros(3))
    target = torch.tensor([1.0, 2.0, 3.0])
    path = tmp_path / "run.pt"
    first = train({"w": weight}, lambda _: ((weight - target) ** 2).sum(), iter(int, 1), 20, lr=0.1,
                  checkpoint=path, progress=False)
    trained = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()
    again = train({"w": weight}, lambda _: ((weight - target) ** 2).sum(), iter(int, 1), 20, lr=0.1,
                  checkpoint=path, progress=False)
    assert again.cached and not first.cached and torch.equal(weight.detach(), trained)
    with pytest.raises(ValueError, match="steps"):
        train({"w": weight}, lambda _: weight.sum(), iter(int, 1), 0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_white_box_runs_on_every_layout(family):
    teacher, tokenizer = tiny_model(family, layers=3)
    technique = WhiteBoxDistillation({"drop": 1, "steps": 2, "seq_len": 16, "batch_size": 2, "checkpoint": False,
                                      "eval_windows": 0, "rule": "block_influence"})
    stage = ModelStage(teacher, tokenizer, ModulePatcher())
    technique.effinfer_transform_model(stage)
    assert stage.model is not teacher and stage.model.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 3
    assert technique.cost.steps == 2 and any("2 steps" in note for note in technique.notes)
    stage.model(input_ids=torch.tensor([[5, 6, 7]]))


def test_bad_configs_are_refused():
    with pytest.raises(ValidationError, match="all loss weights are 0"):
        WhiteBoxDistillation({"forward_kl": 0.0})
    with pytest.raises(ValidationError):
        WhiteBoxDistillation({"temperature": 0.0})
    with pytest.raises(ValidationError):
        WhiteBoxDistillation({"steps": -1})
    config = tiny_llama(layers=4)[0].config
    assert WhiteBoxDistillation({"drop": 3}).check_model_config(config) == [
        "drop=3 leaves fewer than 2 of the model's 4 decoder layers; use drop ≤ 2"]
    assert WhiteBoxDistillation({"drop": 2}).check_model_config(config) == []


def test_black_box_trains_on_answers_even_when_prompts_exceed_seq_len():
    from effinfer.plugins.model.distillation.black_box import BlackBoxDistillation

    teacher, tokenizer = tiny_llama(layers=3, seed=0)
    technique = BlackBoxDistillation({"drop": 1, "steps": 2, "seq_len": 24, "num_prompts": 4, "new_tokens": 8,
                                      "prompt_tokens": 32, "checkpoint": False, "eval_windows": 0})
    stage = ModelStage(teacher, tokenizer, ModulePatcher())
    technique.effinfer_transform_model(stage)
    assert technique.cost.steps == 2 and math.isfinite(technique.cost.final_loss)
    assert stage.model.config.num_hidden_layers == 2
