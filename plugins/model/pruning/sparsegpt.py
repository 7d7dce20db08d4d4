"""SparseGPT: one-shot pruning with OBS-style reconstruction of the remaining weights.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023, arXiv:2301.00774. For a linear layer with inputs ``X`` and
Hessian ``H = 2 X Xᵀ`` (GPTQ's :class:`~effinfer.plugins.model.quantization.gptq.HessianAccumulator`
and dampened inverse Cholesky factor, shared), columns are visited left to right in
blocks; in each block the mask is chosen by the OBS saliency ``w² / [H⁻¹]²_jj`` (exactly
``round(sparsity · rows · block)`` weights of the block, or ``M − N`` of every ``M``
columns per row for ``N:M``, chosen when the group's first column is reached), and the
error of every zeroed weight is spread over the not yet visited columns of its row
through the Cholesky factor (the paper's Algorithm 1 with lazy block updates). Blocks are
calibrated sequentially on the outputs of the already pruned blocks.

With ``bits`` set, pruning and quantization are joint (the paper's section 3.5, "Joint
Sparsification & Quantization"): each kept weight is rounded onto a ``bits``-bit asymmetric
grid (per ``group_size`` input columns, set when the group's first column is reached, as in
GPTQ) in the same column loop, so the error that is spread over the later columns is that of
pruning *and* rounding together, and the pruned positions stay exactly zero (their code is
the group's integer zero point). The layer is then stored packed (``QuantizedLinear``): for
2:4 at 4 bits the weights take about a quarter of fp16's bytes, zeros included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, model_validator

from effinfer.core import Feature, Paper, Requirement, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.pruning.sparse import MaskPruner, PruneConfig, prune_decoder, prune_lowest
from effinfer.plugins.model.quantization.config import CalibrationConfig, group_size_problems
from effinfer.plugins.model.quantization.gptq import HessianAccumulator, inverse_hessian_factor
from effinfer.plugins.model.quantization.packing import (QuantizedTensor, check_bits, check_group_size, grid_params,
                                                         quantize_codes)


@dataclass
class JointGrid:
    """The ``bits``-bit asymmetric grid of one layer, filled column by column during SparseGPT's loop."""

    bits: int
    group: int
    rows: int
    cols: int
    codes: torch.Tensor = field(init=False)
    scales: torch.Tensor = field(init=False)
    zeros: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        groups = self.cols // self.group
        self.codes = torch.zeros(self.rows, self.cols)
        self.scales = torch.zeros(self.rows, groups)
        self.zeros = torch.zeros(self.rows, groups)

    def start_group(self, column: int, weights: torch.Tensor) -> None:
        """Fix the grid of the group starting at ``column`` from its current (updated) ``weights``."""
        g = column // self.group
        self.scales[:, g], self.zeros[:, g] = grid_params(weights, self.bits, symmetric=False)

    def round(self, column: int, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Kept weights rounded onto the grid, pruned ones exactly zero (code = the integer zero point)."""
        g = column // self.group
        scale, zero = self.scales[:, g], self.zeros[:, g]
        code = torch.where(keep, quantize_codes(w, scale, zero, self.bits), zero)
        self.codes[:, column] = code
        return (code - zero) * scale

    def packed(self) -> QuantizedTensor:
        return QuantizedTensor.from_codes(self.codes, self.scales, self.zeros, self.bits, self.group)


def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                           nm: tuple[int, int] | None = None, block_size: int = 128, damp: float = 0.01,
                           grid: JointGrid | None = None) -> torch.Tensor:
    """SparseGPT on one weight (``out × in``) given its inputs' Hessian; returns the pruned, updated weight.

    With a ``grid`` the kept weights are also quantized in the same pass (joint mode): the returned
    weight is then the dequantized one and ``grid`` holds its codes.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = hessian.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = inverse_hessian_factor(H, damp)
    if nm:
        n, m = nm
        if block_size % m:
            block_size = max(m, block_size // m * m)
    if grid is not None:  # a group never straddles two blocks (groups are a multiple of M, checked by the config)
        block_size = max(grid.group, block_size // grid.group * grid.group)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        diag = Hinv1.diagonal()
        errors = torch.zeros_like(W1)
        if nm is None:
            keep = prune_lowest(W1.pow(2) / diag.pow(2).unsqueeze(0), sparsity)
        else:
            keep = torch.ones_like(W1, dtype=torch.bool)
        for i in range(end - start):
            if nm is not None and i % m == 0:
                saliency = W1[:, i:i + m].pow(2) / diag[i:i + m].pow(2).unsqueeze(0)
                keep[:, i:i + m].scatter_(1, torch.topk(saliency, m - n, dim=1, largest=False).indices, False)
            w = W1[:, i]
            if grid is None:
                q = w * keep[:, i]
            else:
                if (start + i) % grid.group == 0:
                    grid.start_group(start + i, W1[:, i:i + grid.group])
                q = grid.round(start + i, w, keep[:, i])
            error = (w - q) / Hinv1[i, i]
            W1[:, i:] -= error.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            errors[:, i] = error
        W[:, start:end] = W1 * keep if grid is None else W1
        W[:, end:] -= errors @ Hinv[start:end, end:]
    return W


class SparseGPT(MaskPruner):
    name = "sparsegpt"
    node = "model.compression.sparsification.weight_pruning.unstructured"
    paper = Paper(title="SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", year=2023,
                  arxiv="2301.00774")
    summary = ("One-shot pruning that chooses each block's mask by the OBS saliency w²/[H⁻¹]² and updates the "
               "remaining weights of every row to compensate (inverse-Hessian Cholesky factor of the calibration "
               "inputs, GPTQ's machinery); unstructured or N:M; blocks calibrated sequentially.")
    requires = frozenset({Requirement.CALIBRATION_DATA})
    bench_config = {"sparsity": 0.5, "n_samples": 8, "seq_len": 256}
    #: the paper's joint mode: 2:4 and 4-bit in one pass, stored packed
    bench_compositions = ("sparsegpt:pattern='2:4',bits=4,n_samples=8,seq_len=256",)

    class Config(PruneConfig, CalibrationConfig):
        damp: float = Field(0.01, gt=0.0, le=1.0, description="dampening added to the Hessian diagonal, as a "
                                                              "fraction of its mean")
        block_size: int = Field(128, ge=8, le=8192, description="columns per mask selection and lazy update")
        bits: int | None = Field(None, description="quantize the kept weights to this many bits in the same pass "
                                                   "(joint sparsity + quantization, stored packed); None = float")
        group_size: int = Field(64, ge=4, le=8192, description="joint mode: input columns sharing one scale and "
                                                                "zero point (a multiple of M for an N:M pattern)")

        @model_validator(mode="after")
        def _joint_grid_is_valid(self):
            if self.bits is None:
                return self
            check_bits(self.bits)
            nm = self.nm()
            if nm and self.group_size % nm[1]:
                raise ValueError(f"group_size={self.group_size}: with pattern={self.pattern!r} it must be a multiple "
                                 f"of M={nm[1]} (e.g. {max(nm[1], self.group_size // nm[1] * nm[1])})")
            if self.execution != "dense":
                raise ValueError(f"execution={self.execution!r} with bits={self.bits}: the joint mode stores the "
                                 "layers packed (QuantizedLinear); leave execution at 'dense'")
            return self

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        if self.config.bits is not None:  # packed layers: no nn.Linear left for a later technique
            self.removes_features = frozenset({Feature.DENSE_WEIGHTS})

    def check_model_config(self, config: Any) -> list[str]:
        problems = super().check_model_config(config)
        if self.config.bits is not None:
            problems += group_size_problems(config, self.config.group_size, self.config.skip_modules,
                                            decoder_only=True)
        return problems

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        def prune(weight: torch.Tensor, stat: HessianAccumulator, config: Any) -> torch.Tensor | QuantizedTensor:
            grid = None
            if config.bits is not None:
                rows, cols = weight.shape
                grid = JointGrid(config.bits, check_group_size(cols, config.group_size), rows, cols)
            pruned = sparsegpt_prune_weight(weight, stat.hessian, config.sparsity, config.nm(), config.block_size,
                                            config.damp, grid)  # prune_decoder runs it on one thread
            return pruned if grid is None else grid.packed()

        prune_decoder(stage, self, prune, lambda m: HessianAccumulator(m.in_features, m.weight.device),
                      HessianAccumulator.add)
