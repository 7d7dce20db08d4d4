"""Knowledge distillation, white-box and black-box (model › compression › distillation).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.

- :mod:`.white_box` — ``kd_white_box``: a layer-dropped student trained on the teacher's logits
  (forward KL, reverse KL, hidden-state MSE);
- :mod:`.black_box` — ``kd_black_box``: the same student fine-tuned only on teacher-generated text;
- :mod:`.student` (the layer-drop student builder), :mod:`.losses` (the objectives), training
  through the shared service :mod:`effinfer.plugins.model.training`.
"""

from effinfer.core import hookimpl


@hookimpl
def effinfer_register_techniques(register):
    from effinfer.plugins.model.distillation.black_box import BlackBoxDistillation
    from effinfer.plugins.model.distillation.white_box import WhiteBoxDistillation

    register(WhiteBoxDistillation)
    register(BlackBoxDistillation)
