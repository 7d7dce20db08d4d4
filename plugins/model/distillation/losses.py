"""The white-box distillation objectives, token by token, as their papers define them.

- forward KL ``KL(p_T ‖ q_S)`` with temperature ``τ`` and the ``τ²`` gradient scale of
  Hinton et al., "Distilling the Knowledge in a Neural Network", arXiv:1503.02531 (standard
  KD: mode-covering);
- reverse KL ``KL(q_S ‖ p_T)`` — the objective of MiniLLM (Gu et al., arXiv:2306.08543;
  mode-seeking), here on the given text (MiniLLM optimises it with policy gradients on
  student samples; the token-level form on fixed text is its teacher-forced variant);
- hidden-state MSE ``mean ‖h_S − h_T‖²`` between matched layers (FitNets, Romero et al.,
  arXiv:1412.6550; TinyBERT, arXiv:1909.10351).

Each returns the mean over the positions where ``mask`` is true (all positions by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """``τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ))`` per position, averaged."""
    log_q = F.log_softmax(student_logits.float() / temperature, -1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, -1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    return temperature ** 2 * _masked_mean(per_position, mask)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """``τ² · KL(softmax(z_S/τ) ‖ softmax(z_T/τ))`` per position, averaged."""
    log_q = F.log_softmax(student_logits.float() / temperature, -1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, -1)
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)
    return temperature ** 2 * _masked_mean(per_position, mask)


def hidden_mse(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the matched pairs of ``mean_positions mean_features (h_S − h_T)²``."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"hidden_mse needs matched, non-empty lists (got {len(student_hidden)} student and "
                         f"{len(teacher_hidden)} teacher states)")
    terms = [_masked_mean(((s.float() - t.float()) ** 2).mean(-1), mask)
             for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(terms).mean()
