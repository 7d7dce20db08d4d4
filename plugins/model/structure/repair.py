"""The shared repair / uptraining service of the efficient-structure conversions.

A structure conversion (MoEfication, GQA/MQA merging, linear attention, SSM layers …) turns a
pretrained model into a cheaper one, then *repairs* it briefly, the way the papers do it
(GQA uptraining, Ainslie et al., arXiv:2305.13245; LoLCATs' attention transfer then
low-rank fine-tuning, Zhang et al., arXiv:2410.10254; Mamba-in-the-Llama, Wang et al.,
arXiv:2408.15237: layer-wise then end-to-end distillation). This module offers the two
steps once, on top of the shared training loop :func:`effinfer.plugins.model.training.train`
(AdamW, rich progress bar, checkpoint cache, :class:`~effinfer.plugins.model.training.TrainingCost`)
and the KD objectives of :mod:`effinfer.plugins.model.distillation.losses`; no plugin
writes a loop of its own.

How a plugin uses it
--------------------
1. **Record the conversion.** Make every swap through a :class:`Conversion` (it wraps the
   stage's :class:`~effinfer.core.stages.ModulePatcher`, so the composition still restores
   the model, and it keeps the originals for as long as the repair needs them)::

       conversion = Conversion(stage.patcher)
       conversion.replace_module(layer, "mlp", new_mlp)            # -> the old module
       conversion.set_attr(stage.model.config, "num_key_value_heads", 1)

   ``with conversion.original(): ...`` runs the *original* model (every recorded swap undone
   for the block, then redone), so the original model is the KD teacher without a copy. The
   teacher is only the original model if the trained parameters are not shared with it:
   hand over parameters of the *new* modules; :func:`repair` refuses parameters the teacher
   also uses (pass ``teacher=<a frozen copy>`` to train shared ones, e.g. norms).
   ``conversion.release()`` drops the originals afterwards (their memory returns when the
   patcher does not keep them, ``keep_originals=False``).

2. **Layer-wise fit** (optional, before the end-to-end step)::

       fit_layers(model, [FitTarget(index=3, path="self_attn", original=old, replacement=new,
                                    parameters={...})], tokens, config)        -> list[FitReport]
       fit_layer(model, 3, "self_attn", old, new, parameters, tokens, config)  -> FitReport

   ``tokens`` (``n × seq_len`` ids, e.g. ``stage.calibration_batches(config.fit_samples,
   config.fit_seq_len)``) run through the model with
   :func:`~effinfer.plugins.model.quantization.layerwise.first_layer_inputs` /
   :func:`~effinfer.plugins.model.quantization.layerwise.run_layer` (one decoder layer's
   activations held at a time). At each target's decoder layer the call of ``original`` at
   ``path`` (relative to the decoder layer, e.g. ``"self_attn"`` or ``"mlp"``) is captured —
   positional and keyword arguments (hidden states, rotary embeddings, masks) and its output
   — and ``replacement`` is trained to reproduce that output, loss ``‖y' − y‖² / ‖y‖²`` (MSE
   relative to the target's energy), with the same arguments. ``replacement`` must take the
   same call as ``original`` and return a tensor or a tuple whose first item is the output.
   Inputs of later layers come from the converted model (``fit_inputs="converted"``, GPTQ's
   sequential scheme: each layer is fitted on the activations it will see) or from the
   original (``"original"``). On return, the module at ``path`` is whatever it was when
   called (normally the replacement).

3. **End-to-end KD repair**::

       report = repair(stage.model, stage.tokenizer, parameters, conversion, config,
                       name="gqa_convert", identity=[...])                   -> RepairReport | None
       for line in report.notes(): technique.note(line)

   or, in a technique whose ``Config`` inherits :class:`RepairConfig`, the same in one call that
   also notes the report and freezes the parameters again:
   ``repair_technique(self, stage.model, stage.tokenizer, parameters, conversion)``.

   ``parameters`` (name → ``nn.Parameter``) are the only parameters trained (every other
   parameter is frozen for the run, gradients included, and its flag restored after).
   The loss on seeded windows of the calibration corpus is
   ``kd_weight · KD(teacher ‖ model) + (1 − kd_weight) · CE(next token)`` with KD forward KL
   (Hinton et al., arXiv:1503.02531) or reverse KL (MiniLLM, arXiv:2306.08543) at
   ``repair_temperature``. ``identity`` is anything that identifies the conversion (its
   config): with ``repair_checkpoint`` the trained parameters are cached under a key of
   the original's and the converted model's fingerprints, ``name``, ``identity`` and the repair config, so an
   identical run is read back instead of trained. It returns ``None`` when
   ``repair_steps == 0``. The report holds the :class:`TrainingCost` and, with
   ``repair_eval_windows > 0``, held-out (wikipedia *test* split) perplexity and KL to the
   original before and after; :meth:`RepairReport.notes` gives the run-record lines.

Configs: plugins inherit the flat field sets :class:`RepairConfig` (``repair_*``) and
:class:`LayerFitConfig` (``fit_*``) into their own ``Config`` (``class Config(CalibrationConfig,
LayerFitConfig, RepairConfig)``), so ``-t name:repair_steps=30`` works from the CLI;
``repair_steps=0`` / ``fit_steps=0`` skip the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from effinfer.core.stages import ModulePatcher
from effinfer.plugins.model.calibration import model_fingerprint
from effinfer.plugins.model.distillation.common import before_after_note, held_out_windows, probe
from effinfer.plugins.model.distillation.losses import forward_kl, reverse_kl
from effinfer.plugins.model.quantization.layerwise import LayerBatch, decoder_layers, first_layer_inputs, run_layer
from effinfer.plugins.model.training import TrainingCost, checkpoint_path, run_key, token_batches, train

__all__ = ["Conversion", "FitReport", "FitTarget", "LayerFitConfig", "RepairConfig", "RepairReport", "fit_layer",
           "fit_layers", "repair", "repair_technique", "trainable_parameters"]


# --------------------------------------------------------------------------- configs


class RepairConfig(BaseModel):
    """End-to-end KD repair after a conversion (inherit into a technique's ``Config``)."""

    model_config = ConfigDict(extra="forbid")

    repair_steps: int = Field(0, ge=0, le=100_000, description="optimizer steps of end-to-end KD repair against "
                                                               "the original model (0: no repair)")
    repair_batch_size: int = Field(2, ge=1, le=256, description="sequences per repair step")
    repair_seq_len: int = Field(128, ge=8, le=8192, description="tokens per repair sequence")
    repair_lr: float = Field(1e-4, gt=0.0, le=1e-2, description="AdamW peak learning rate of the repair (warm-up "
                                                                "10%, cosine decay to 10%)")
    repair_objective: Literal["forward_kl", "reverse_kl"] = Field(
        "forward_kl", description="KD term: KL(original ‖ converted) (Hinton) or KL(converted ‖ original) (MiniLLM)")
    repair_kd_weight: float = Field(1.0, ge=0.0, le=1.0, description="weight of the KD term; 1 − this weights "
                                                                     "next-token cross-entropy on the text")
    repair_temperature: float = Field(1.0, ge=0.1, le=20.0, description="softmax temperature of the KD term")
    repair_seed: int = Field(0, ge=0, description="seed of the repair data order")
    repair_checkpoint: bool = Field(True, description="keep the repaired parameters in the cache (an identical "
                                                      "run is read back instead of trained again)")
    repair_eval_windows: int = Field(2, ge=0, le=256, description="held-out test-split windows on which the run "
                                                                  "record reports perplexity and KL to the original "
                                                                  "before and after repair (0: skip)")


class LayerFitConfig(BaseModel):
    """Layer-wise fit of replacement submodules to the originals' outputs (inherit into a ``Config``)."""

    model_config = ConfigDict(extra="forbid")

    fit_steps: int = Field(0, ge=0, le=100_000, description="optimizer steps per replaced submodule of the "
                                                            "layer-wise MSE fit (0: no layer-wise fit)")
    fit_lr: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW peak learning rate of the layer-wise fit")
    fit_samples: int = Field(8, ge=1, le=4096, description="calibration windows captured for the layer-wise fit")
    fit_seq_len: int = Field(128, ge=8, le=8192, description="tokens per layer-wise fit window")
    fit_batch_size: int = Field(2, ge=1, le=256, description="windows per layer-wise fit step")
    fit_inputs: Literal["converted", "original"] = Field(
        "converted", description="inputs of later layers: from the converted earlier layers (sequential, as "
                                 "GPTQ) or from the original model")


# --------------------------------------------------------------------------- the conversion record


class Conversion:
    """The swaps of one conversion, made through the stage's patcher and kept to run the original.

    See the module docstring; ``swaps`` are ``(owner, attribute, original, converted)``.
    """

    def __init__(self, patcher: ModulePatcher) -> None:
        self.patcher = patcher
        self.swaps: list[tuple[object, str, Any, Any]] = []
        self._in_original = False

    def set_attr(self, owner: object, name: str, value: Any) -> None:
        old = getattr(owner, name)
        self.patcher.set_attr(owner, name, value)
        self.swaps.append((owner, name, old, value))

    def replace_module(self, root: nn.Module, path: str, new: nn.Module) -> nn.Module:
        """Put ``new`` at dotted ``path`` under ``root``; return the module it replaced."""
        old = root.get_submodule(path)
        owner_path, _, child = path.rpartition(".")
        self.set_attr(root.get_submodule(owner_path), child, new)  # get_submodule("") is root itself
        return old

    @contextmanager
    def original(self) -> Iterator[None]:
        """Run the original model inside this block (every swap undone, newest first; redone after)."""
        if self._in_original:
            yield
            return
        self._in_original = True
        try:
            for owner, name, old, _ in reversed(self.swaps):
                setattr(owner, name, old)
            yield
        finally:
            for owner, name, _, new in self.swaps:
                setattr(owner, name, new)
            self._in_original = False

    def teacher(self, model: nn.Module) -> Callable[..., Any]:
        """A callable that runs ``model`` as it was before the conversion, without gradients."""

        def run(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad(), self.original():
                return model(*args, **kwargs)

        return run

    def release(self) -> None:
        """Forget the originals (the patcher still restores what it keeps)."""
        self.swaps.clear()


def trainable_parameters(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """The floating-point parameters of the named modules, as ``"<module name>.<parameter>"`` → parameter."""
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module in modules.items():
        for name, parameter in module.named_parameters():
            if parameter.is_floating_point() and id(parameter) not in seen:
                seen.add(id(parameter))
                found[f"{prefix}.{name}"] = parameter
    return found


@contextmanager
def _only_trainable(model: nn.Module, parameters: dict[str, nn.Parameter], extra: Sequence[nn.Module] = ()
                    ) -> Iterator[None]:
    """Freeze everything but ``parameters`` (under ``model`` and ``extra`` modules); restore the flags after."""
    chosen = {id(p) for p in parameters.values()}
    everything = {id(p): p for m in (model, *extra) for p in m.parameters()} | {id(p): p for p in parameters.values()}
    flags = {key: p.requires_grad for key, p in everything.items()}
    try:
        for key, parameter in everything.items():
            parameter.requires_grad_(key in chosen)
        yield
    finally:
        for key, parameter in everything.items():
            parameter.requires_grad_(flags[key])


# --------------------------------------------------------------------------- end-to-end repair


@dataclass
class RepairReport:
    """What a repair cost and did."""

    cost: TrainingCost
    objective: str
    trained_parameters: int
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    windows: int = 0

    def notes(self) -> list[str]:
        lines = [f"repair ({self.objective}, {self.trained_parameters / 1e6:.2f} M parameters trained): "
                 f"{self.cost.describe()}"]
        if self.before is not None and self.after is not None:
            lines.append(before_after_note({"before": self.before, "after": self.after}, self.windows)
                         .replace("KL to teacher", "KL to the original"))
        return lines


def objective_text(config: RepairConfig) -> str:
    kd = "FKL" if config.repair_objective == "forward_kl" else "RKL"
    if config.repair_kd_weight == 1:
        text = kd
    elif config.repair_kd_weight == 0:
        text = "CE"
    else:
        text = f"{config.repair_kd_weight:g}·{kd} + {1 - config.repair_kd_weight:g}·CE"
    return text + (f", τ={config.repair_temperature:g}" if config.repair_temperature != 1 else "")


def repair_loss(model: nn.Module, teacher: Callable[..., Any], ids: torch.Tensor, config: RepairConfig
                ) -> torch.Tensor:
    """``kd_weight · KD + (1 − kd_weight) · CE`` of ``model`` on ``ids`` (``teacher`` gives the KD target)."""
    out = model(input_ids=ids, use_cache=False)
    total = out.logits.new_zeros((), dtype=torch.float32)
    weight = config.repair_kd_weight
    if weight > 0:
        reference = teacher(input_ids=ids, use_cache=False).logits
        kd = forward_kl if config.repair_objective == "forward_kl" else reverse_kl
        total = total + weight * kd(out.logits, reference, config.repair_temperature)
    if weight < 1:
        logits = out.logits[:, :-1].float()
        total = total + (1 - weight) * nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                   ids[:, 1:].reshape(-1))
    return total


def repair(model: nn.Module, tokenizer: Any, parameters: dict[str, nn.Parameter], teacher: Conversion | nn.Module,
           config: RepairConfig, *, name: str, identity: Sequence[Any] = (), progress: bool = True
           ) -> RepairReport | None:
    """End-to-end KD repair of the converted ``model`` against the original (see the module docstring).

    ``teacher``: the :class:`Conversion` that made ``model`` (the original is run by undoing it
    for each teacher forward), or a separate frozen module (a copy of the original).
    """
    if config.repair_steps == 0:
        return None
    if not parameters:
        raise ValueError(f"{name}: repair_steps={config.repair_steps} but the conversion hands over no parameters "
                         "to train; set repair_steps=0")
    if isinstance(teacher, Conversion):
        with teacher.original():
            teacher_ids = {id(p) for p in model.parameters()}
            fingerprint = model_fingerprint(model)
        shared = [n for n, p in parameters.items() if id(p) in teacher_ids]
        if shared:
            raise ValueError(f"{name}: the repair would train {len(shared)} parameter(s) the original model also "
                             f"uses ({', '.join(shared[:3])}{' …' if len(shared) > 3 else ''}), so the teacher would "
                             "drift; hand over only the new modules' parameters, or pass a frozen copy of the "
                             "original as teacher")
        run_teacher = teacher.teacher(model)
        extra: list[nn.Module] = []
    else:
        fingerprint = model_fingerprint(teacher)
        teacher.eval()

        def run_teacher(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                return teacher(*args, **kwargs)

        extra = [teacher]
    device = next(model.parameters()).device
    dtype = str(next(model.parameters()).dtype)
    options = config.model_dump(include={k for k in RepairConfig.model_fields if k not in
                                         ("repair_checkpoint", "repair_eval_windows")})
    # the converted model's own fingerprint too: a conversion that is not bit-reproducible (a k-means or a
    # router trained with another thread count) must not be handed parameters repaired from another start
    start = model_fingerprint(model)
    path = (checkpoint_path("structure_repair", run_key(name, fingerprint, start, dtype, list(identity), options,
                                                        sorted(parameters)))
            if config.repair_checkpoint else None)
    windows = held_out_windows(tokenizer, config.repair_eval_windows, config.repair_seq_len)
    was_training = model.training
    with _only_trainable(model, parameters, extra):
        before = probe(model, run_teacher, windows) if windows is not None else None
        batches = (b.to(device) for b in token_batches(tokenizer, config.repair_batch_size, config.repair_seq_len,
                                                       config.repair_seed))
        model.train()
        try:
            cost = train(parameters, lambda ids: repair_loss(model, run_teacher, ids, config), batches,
                         config.repair_steps, lr=config.repair_lr, warmup=max(1, config.repair_steps // 10),
                         checkpoint=path, description=f"{name}: repair ({objective_text(config)})",
                         progress=progress)
        finally:
            model.train(was_training)
        after = probe(model, run_teacher, windows) if windows is not None else None
    return RepairReport(cost, objective_text(config), sum(p.numel() for p in parameters.values()), before, after,
                        0 if windows is None else len(windows))


def repair_technique(technique: Any, model: nn.Module, tokenizer: Any, parameters: dict[str, nn.Parameter],
                     teacher: Conversion | nn.Module) -> RepairReport | None:
    """:func:`repair` with a technique's own config (a :class:`RepairConfig` subclass): its name, the
    rest of its config as the checkpoint identity, the report's lines added to its notes, and the
    trained parameters frozen again afterwards."""
    config = technique.config
    report = repair(model, tokenizer, parameters, teacher, config, name=technique.name,
                    identity=[config.model_dump(exclude=set(RepairConfig.model_fields))])
    for line in report.notes() if report else []:
        technique.note(line)
    for parameter in parameters.values():
        parameter.requires_grad_(False)
    return report


# --------------------------------------------------------------------------- layer-wise fit


@dataclass
class FitTarget:
    """One replacement to fit: decoder layer ``index``, its submodule ``path`` (relative to the layer)."""

    index: int
    path: str
    original: nn.Module
    replacement: nn.Module
    #: the parameters trained (default: every floating-point parameter of ``replacement``)
    parameters: dict[str, nn.Parameter] | None = None


@dataclass
class FitReport:
    """The relative output error of one fitted replacement before and after, and the fit's cost."""

    index: int
    path: str
    error_before: float
    error_after: float
    cost: TrainingCost | None = None

    def describe(self) -> str:
        spent = f" ({self.cost.steps} steps, {self.cost.seconds:.1f} s)" if self.cost else ""
        return f"layer {self.index} {self.path}: relative error {self.error_before:.4f} → {self.error_after:.4f}{spent}"


@dataclass
class _Captured:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor
    ids: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0))


def _first(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


@contextmanager
def _installed(layer: nn.Module, path: str, module: nn.Module) -> Iterator[None]:
    """``module`` at ``path`` of ``layer`` inside the block, whatever was there put back after."""
    parent_path, _, child = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    previous = getattr(parent, child)
    setattr(parent, child, module)
    try:
        yield
    finally:
        setattr(parent, child, previous)


@torch.no_grad()
def _capture(layer: nn.Module, target: FitTarget, batches: list[LayerBatch], tokens: list[torch.Tensor]
             ) -> list[_Captured]:
    """The original submodule's calls (arguments and output) while ``layer`` runs on ``batches``."""
    calls: list[_Captured] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        calls.append(_Captured(_detached(args), _detached(kwargs), _first(output).detach()))

    with _installed(layer, target.path, target.original):
        handle = target.original.register_forward_hook(hook, with_kwargs=True)
        try:
            for batch, ids in zip(batches, tokens):
                before = len(calls)
                run_layer(layer, [batch])
                if len(calls) != before + 1:
                    raise RuntimeError(f"layer-wise fit: decoder layer {target.index} called its {target.path!r} "
                                       f"{len(calls) - before} times in one forward (expected once)")
                calls[-1].ids = ids
        finally:
            handle.remove()
    return calls


def _relative_error(module: nn.Module, calls: list[_Captured]) -> float:
    with torch.no_grad():
        num = sum(float((_first(module(*c.args, **c.kwargs)).float() - c.output.float()).pow(2).sum()) for c in calls)
        den = sum(float(c.output.float().pow(2).sum()) for c in calls)
    return num / max(den, 1e-30)


def _fit(target: FitTarget, calls: list[_Captured], config: LayerFitConfig, progress: bool) -> TrainingCost:
    parameters = target.parameters if target.parameters is not None else trainable_parameters(
        {target.path: target.replacement})
    if not parameters:
        raise ValueError(f"layer-wise fit: the replacement at layer {target.index} {target.path!r} has no "
                         "parameters to train; set fit_steps=0")
    generator = torch.Generator().manual_seed(target.index)
    per_step = max(1, config.fit_batch_size // max(1, calls[0].output.shape[0]))

    def batches() -> Iterator[tuple[torch.Tensor, list[_Captured]]]:
        while True:
            chosen = [calls[i] for i in torch.randint(0, len(calls), (per_step,), generator=generator).tolist()]
            yield torch.cat([c.ids for c in chosen]), chosen

    def loss_fn(batch: tuple[torch.Tensor, list[_Captured]]) -> torch.Tensor:
        total = None
        for call in batch[1]:
            out = _first(target.replacement(*call.args, **call.kwargs)).float()
            reference = call.output.float()
            term = (out - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30)
            total = term if total is None else total + term
        return total / len(batch[1])

    was_training = target.replacement.training
    target.replacement.train()
    everything = {id(p): p for p in target.replacement.parameters()} | {id(p): p for p in parameters.values()}
    flags = {key: p.requires_grad for key, p in everything.items()}
    try:
        for key, parameter in everything.items():
            parameter.requires_grad_(any(parameter is p for p in parameters.values()))
        return train(parameters, loss_fn, batches(), config.fit_steps, lr=config.fit_lr,
                     warmup=max(1, config.fit_steps // 10), description=f"fit layer {target.index} {target.path}",
                     progress=progress)
    finally:
        target.replacement.train(was_training)
        for key, parameter in everything.items():
            parameter.requires_grad_(flags[key])


def fit_layers(model: nn.Module, targets: Sequence[FitTarget], tokens: torch.Tensor, config: LayerFitConfig,
               progress: bool = True) -> list[FitReport]:
    """Fit every target's replacement to its original's outputs, layer by layer (see the module docstring).

    With ``fit_steps == 0`` only the errors are measured (before = after).
    """
    _, layers = decoder_layers(model)
    by_layer: dict[int, list[FitTarget]] = {}
    for target in targets:
        if not 0 <= target.index < len(layers):
            raise ValueError(f"layer-wise fit: layer index {target.index} out of range (the model has "
                             f"{len(layers)} decoder layers: 0 … {len(layers) - 1})")
        by_layer.setdefault(target.index, []).append(target)
    if not by_layer:
        return []
    device = next(model.parameters()).device
    batches = first_layer_inputs(model, tokens, config.fit_batch_size)
    token_chunks = [chunk.to(device) for chunk in tokens.split(config.fit_batch_size)]
    reports = []
    for index in range(max(by_layer) + 1):
        layer = layers[index]
        for target in by_layer.get(index, []):
            calls = _capture(layer, target, batches, token_chunks)
            with _installed(layer, target.path, target.replacement):
                before = _relative_error(target.replacement, calls)
                cost = _fit(target, calls, config, progress) if config.fit_steps else None
                after = _relative_error(target.replacement, calls) if cost else before
            reports.append(FitReport(index, target.path, before, after, cost))
            del calls
        if index == max(by_layer):
            break
        if config.fit_inputs == "original":
            with _all_installed(layer, [(t.path, t.original) for t in by_layer.get(index, [])]):
                batches = run_layer(layer, batches)
        else:
            batches = run_layer(layer, batches)
    return reports


@contextmanager
def _all_installed(layer: nn.Module, modules: list[tuple[str, nn.Module]]) -> Iterator[None]:
    if not modules:
        yield
        return
    (path, module), rest = modules[0], modules[1:]
    with _installed(layer, path, module), _all_installed(layer, rest):
        yield


def fit_layer(model: nn.Module, index: int, path: str, original: nn.Module, replacement: nn.Module,
              parameters: dict[str, nn.Parameter] | None, tokens: torch.Tensor, config: LayerFitConfig,
              progress: bool = True) -> FitReport:
    """:func:`fit_layers` for one replacement."""
    return fit_layers(model, [FitTarget(index, path, original, replacement, parameters)], tokens, config,
                      progress)[0]


def fit_notes(reports: Sequence[FitReport]) -> list[str]:
    """Run-record lines of a layer-wise fit: the mean relative error before and after, and its cost."""
    if not reports:
        return []
    before = sum(r.error_before for r in reports) / len(reports)
    after = sum(r.error_after for r in reports) / len(reports)
    seconds = sum(r.cost.seconds for r in reports if r.cost)
    steps = sum(r.cost.steps for r in reports if r.cost)
    worst = max(reports, key=lambda r: r.error_after)
    return [f"layer-wise fit of {len(reports)} submodule(s): mean relative output error {before:.4f} → {after:.4f} "
            f"({steps} steps, {seconds:.1f} s); worst {worst.describe()}"]
