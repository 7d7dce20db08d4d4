"""LLM.int8(): vector-wise int8 matrix multiplication with mixed-precision outlier decomposition.

Dettmers, Lewis, Belkada & Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale", NeurIPS 2022, arXiv:2208.07339.

Vector-wise quantization gives every row of the activations (token) and every output
row of the weight its own absmax scale, so ``X W ≈ diag(c_x) (X_i8 W_i8) diag(c_w)`` runs
as an int8 GEMM with int32 accumulation. Its weak point is a few *feature dimensions*
whose activations reach magnitudes far above the rest (the paper's emergent outliers,
``|x| ≥ 6``): they are decomposed out, ``X W = X_O W_O + X_R W_R``, and the outlier part
is multiplied in 16-bit precision. Here the outlier dimensions are found on calibration
data (any token with ``|x_j|`` above ``threshold``) and their weight columns are kept in
float16; optionally, features that cross the threshold at run time are decomposed too
(their weight columns dequantized from int8, as bitsandbytes does). Everything else runs
through ``torch._int_mm``.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.calibration import activation_stats
from effinfer.plugins.model.quantization.config import (CalibrationConfig, TargetConfig, maybe_save, selected_linears,
                                                        swap_in, weight_math_threads)
from effinfer.plugins.model.quantization.layers import OutlierInt8Linear, PackedLayer


def outlier_features(absmax: torch.Tensor, threshold: float, max_fraction: float) -> torch.Tensor:
    """Indices of input features whose calibration magnitude exceeds ``threshold`` (largest first, capped)."""
    over = (absmax > threshold).nonzero().flatten()
    cap = int(max_fraction * absmax.numel())
    if over.numel() > cap:
        over = over[absmax[over].argsort(descending=True)[:cap]]
    return over.sort().values


class LLMInt8(Technique):
    name = "llm_int8"
    node = "model.compression.quantization.ptq.weight_activation"
    paper = Paper(title="LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", year=2022,
                  arxiv="2208.07339")
    summary = ("Vector-wise int8 quantization (a scale per token and per output row, integer GEMM) with "
               "mixed-precision decomposition: input feature dimensions whose activations exceed a threshold "
               "(found on calibration data, optionally also at run time) are multiplied in float with float16 "
               "weight columns.")
    lossless = False
    requires = frozenset({Requirement.CALIBRATION_DATA})
    removes_features = frozenset({"dense_weights"})
    #: `effinfer bench --suite quick`: 8 × 256 calibration tokens
    bench_config = {"threshold": 6.0, "n_samples": 8, "seq_len": 256}

    class Config(TargetConfig, CalibrationConfig):
        threshold: float = Field(6.0, gt=0.0, le=1000.0, description="activation magnitude above which a feature "
                                                                     "dimension is an outlier (the paper uses 6)")
        runtime_outliers: bool = Field(True, description="also decompose features that exceed the threshold at "
                                                         "run time (not only those seen in calibration)")
        max_outlier_fraction: float = Field(0.1, gt=0.0, le=1.0,
                                            description="cap on calibrated outlier features per layer, as a "
                                                        "fraction of its input features (largest kept)")

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        config = self.config
        started = time.perf_counter()
        tokens = stage.calibration_batches(config.n_samples, config.seq_len)
        stats = activation_stats(stage.model, tokens, config.batch_size)
        linears = selected_linears(stage.model, config.skip_modules)
        swapped: dict[str, PackedLayer] = {}
        outliers = 0
        with weight_math_threads():
            for name, linear in linears:
                features = outlier_features(stats[name].absmax, config.threshold, config.max_outlier_fraction)
                outliers += features.numel()
                swapped[name] = OutlierInt8Linear(linear.weight, linear.bias, features,
                                                  config.threshold if config.runtime_outliers else None)
        features_total = sum(m.in_features for _, m in linears)
        self.note(swap_in(stage, linears, swapped, "LLM.int8() vector-wise int8"))
        self.note(f"{outliers} of {features_total} input features ({outliers / max(1, features_total):.2%}) exceed "
                  f"|x| > {config.threshold} on {tokens.shape[0]}×{tokens.shape[1]} calibration tokens and stay in "
                  f"float16; runtime decomposition {'on' if config.runtime_outliers else 'off'}; calibrated in "
                  f"{time.perf_counter() - started:.1f} s")
        maybe_save(stage, config.save_dir, self)


@hookimpl
def effinfer_register_techniques(register):
    register(LLMInt8)
