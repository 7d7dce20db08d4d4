"""Quantized linear layers: what replaces ``nn.Linear`` after a quantizer ran.

Every layer stores its weight really in low bit and says which execution path runs it:

========================  ===================================================================
``QuantizedLinear``       weight-only (W8A16, W4A16, W3A16 …), one of four modes:
                          ``kernel`` — PyTorch's packed int8/int4 CPU kernels (bf16 activations
                          around the call); ``native`` — effinfer's own kernels
                          (:func:`effinfer.kernels.dequant_matmul`: the packed codes read directly
                          by the decode matmul, a blocked GEMM that dequantizes them panel by panel
                          for a prefill; Triton on CUDA); ``dequant`` — packed codes dequantized to float on
                          every call (the reference path; any bit width); ``fake`` — the
                          dequantized float weight is stored (fake quantization: formats are
                          studied, nothing is saved in memory)
``Int8DynamicLinear``     W8A8: int8 weights × int8 activations (per-token dynamic or static
                          per-tensor scales) through a real integer GEMM (``torch._int_mm``)
``OutlierInt8Linear``     LLM.int8(): vector-wise int8 GEMM plus the outlier input features
                          computed in higher precision
========================  ===================================================================

All derive from :class:`PackedLayer`, whose :meth:`~PackedLayer.export` gives portable
tensors and metadata for :mod:`~effinfer.plugins.model.quantization.checkpoint`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from effinfer import kernels as effinfer_kernels
from effinfer.plugins.model.quantization import kernels
from effinfer.plugins.model.quantization.packing import QuantizedTensor, pack_codes

Mode = Literal["kernel", "native", "dequant", "fake"]
Execution = Literal["auto", "kernel", "native", "dequant", "fake"]


class PackedLayer(nn.Module):
    """Base class of quantized layers that a checkpoint can save and rebuild."""

    registry: ClassVar[dict[str, type[PackedLayer]]] = {}
    in_features: int
    out_features: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        PackedLayer.registry[cls.__name__] = cls

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(metadata, tensors)``, portable across machines (no kernel-specific layouts)."""
        return self.metadata(), {k: v.detach() for k, v in self.state_dict().items()}

    def metadata(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_export(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PackedLayer:
        raise NotImplementedError

    def path(self) -> str:
        """The execution path, for notes and results (e.g. ``int4 packed kernel``)."""
        raise NotImplementedError


def _bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


class QuantizedLinear(PackedLayer):
    """A weight-only quantized linear layer (see the module docstring for the modes).

    ``dense_above`` (kernel mode): when a call has more than this many rows (a long
    prefill), the weight is dequantized once and a float GEMM runs instead of the
    packed kernel; ``None`` always uses the kernel.
    """

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None, mode: Mode = "dequant",
                 dense_above: int | None = None) -> None:
        super().__init__()
        self.bits, self.group_size, self.symmetric = weight.bits, weight.group_size, weight.symmetric
        self.zero = "none" if weight.symmetric else ("float" if weight.float_zero else "int")
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.dense_above = dense_above
        self.kernel: str | None = None
        if mode == "kernel":
            self.kernel, reason = kernels.kernel_for(weight)
            if self.kernel is None:
                raise ValueError(f"no packed kernel runs this {weight.bits}-bit weight: {reason}")
        self.mode = mode
        self._store(weight)
        self.bias = _bias(bias)
        if mode == "native":
            reason = native_problem(weight)
            if reason:
                raise ValueError(f"execution='native' cannot run this weight: {reason}")
            kernel_form = effinfer_kernels.PackedWeight.from_quantized(weight)
            # the kernels' float32 scale and folded zero per group (counted: they are read every step)
            self.register_buffer("kernel_scales", kernel_form.scales, persistent=False)
            self.register_buffer("kernel_bias", kernel_form.bias, persistent=False)

    def _store(self, weight: QuantizedTensor) -> None:
        if self.kernel == "int8":
            qweight, scales = kernels.int8_kernel_weight(weight)
            self.register_buffer("qweight", qweight)
            self.register_buffer("qscales", scales)
        elif self.kernel == "int4":
            packed, scales_and_zeros = kernels.int4_kernel_weight(weight)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
        else:
            if self.mode == "fake":
                self.register_buffer("weight", weight.dequantize())
            else:
                self.register_buffer("packed", weight.packed)
            self.register_buffer("scales", weight.scales)
            self.register_buffer("zeros", weight.zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None, symmetric: bool,
                    mode: Mode = "dequant") -> QuantizedLinear:
        from effinfer.plugins.model.quantization.packing import quantize

        return cls(quantize(linear.weight, bits, group_size, symmetric), linear.bias, mode)

    def quantized_weight(self) -> QuantizedTensor:
        """The weight in the plain packed form (whatever the mode)."""
        if self.kernel == "int8":
            return kernels.int8_kernel_tensor(self.qweight, self.qscales)
        if self.kernel == "int4":
            return kernels.int4_kernel_tensor(self.qweight, self.scales_and_zeros, self.in_features, self.zero)
        if self.mode == "fake":
            grid = QuantizedTensor(torch.empty(0, 0), self.scales, self.zeros, self.bits, self.group_size,
                                   self.in_features)
            zero, scales = grid.zero_points().unsqueeze(-1), self.scales.float().unsqueeze(-1)
            groups = self.weight.float().view(self.out_features, -1, self.group_size)
            codes = torch.round(groups / scales + zero).view(self.out_features, -1)
            return QuantizedTensor(pack_codes(codes.to(torch.uint8), self.bits), self.scales, self.zeros, self.bits,
                                   self.group_size, self.in_features)
        return QuantizedTensor(self.packed, self.scales, self.zeros, self.bits, self.group_size, self.in_features)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized float weight."""
        if self.kernel == "int8":
            return (self.qweight.to(dtype) * self.qscales.to(dtype).unsqueeze(1))
        if self.kernel == "int4":
            return kernels.int4_kernel_dequantize(self.qweight, self.scales_and_zeros, self.in_features, dtype)
        if self.mode == "fake":
            return self.weight.to(dtype)
        return self.quantized_weight().dequantize(dtype)

    def packed_weight(self) -> effinfer_kernels.PackedWeight:
        """The weight as the kernels read it (``native`` mode: shares this layer's buffers)."""
        if self.mode != "native":
            return effinfer_kernels.PackedWeight.from_quantized(self.quantized_weight())
        parts = (self.packed, self.kernel_scales, self.kernel_bias)
        cached = getattr(self, "_packed_weight", None)
        # kept while the buffers are the same tensors (a new one per call: 17 against 9 µs, ~210 calls a prefill)
        if cached is None or any(a is not b for a, b in zip(parts, (cached.packed, cached.scales, cached.bias))):
            cached = self._packed_weight = effinfer_kernels.PackedWeight(*parts, self.bits, self.group_size,
                                                                         self.in_features)
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "native" and x.dtype == torch.float32:
            out = effinfer_kernels.dequant_matmul(x, self.packed_weight())
            return out if self.bias is None else out + self.bias.to(out.dtype)
        rows = x.numel() // self.in_features
        if self.kernel is not None and (self.dense_above is None or rows <= self.dense_above):
            if self.kernel == "int8":
                out = kernels.int8_weight_only_mm(x, self.qweight, self.qscales)
            else:
                out = kernels.int4_weight_only_mm(x, self.qweight, self.group_size, self.scales_and_zeros)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        return F.linear(x, self.dense_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def path(self) -> str:
        if self.kernel is not None:
            return f"{self.kernel} packed kernel"
        if self.mode == "native":
            return f"int{self.bits} effinfer kernels"
        return "fake-quant (float weight)" if self.mode == "fake" else f"int{self.bits} dequantize-per-call"

    def metadata(self) -> dict[str, Any]:
        return super().metadata() | {"bits": self.bits, "group_size": self.group_size, "zero": self.zero,
                                     "mode": self.mode, "dense_above": self.dense_above}

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        weight = self.quantized_weight()
        tensors = {"packed": weight.packed, "scales": weight.scales}
        if weight.zeros is not None:
            tensors["zeros"] = weight.zeros
        if self.bias is not None:
            tensors["bias"] = self.bias.detach()
        return self.metadata(), tensors

    @classmethod
    def from_export(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
        weight = QuantizedTensor(tensors["packed"], tensors["scales"], tensors.get("zeros"), meta["bits"],
                                 meta["group_size"], meta["in_features"])
        return cls(weight, tensors.get("bias"), meta["mode"], meta.get("dense_above"))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
                f"zero={self.zero}, path={self.path()}")


def build_quantized_linear(weight: QuantizedTensor, bias: torch.Tensor | None, execution: Execution,
                           name: str = "", dense_above: int | None = None) -> QuantizedLinear:
    """The layer for ``weight`` under an ``execution`` preference (``auto`` = kernel when one fits)."""
    if execution == "kernel":
        kernel, reason = kernels.kernel_for(weight)
        if kernel is None:
            raise ValueError(f"execution='kernel' but no packed kernel runs layer {name or '?'}: {reason}; "
                             "use execution='auto' (falls back to dequantize-per-call) or 'dequant'/'fake'")
    if execution == "native":
        reason = native_problem(weight)
        if reason:
            raise ValueError(f"execution='native' cannot run layer {name or '?'}: {reason}; use execution='auto'")
        return QuantizedLinear(weight, bias, "native")
    if execution in ("auto", "kernel") and kernels.kernel_for(weight)[0] is not None:
        return QuantizedLinear(weight, bias, "kernel", dense_above)
    return QuantizedLinear(weight, bias, "fake" if execution == "fake" else "dequant")


def native_problem(weight: QuantizedTensor) -> str | None:
    """Why effinfer's kernels cannot run ``weight`` in ``native`` mode (``None`` when they can)."""
    if weight.bits not in (4, 8):
        return f"the effinfer kernels read 4- and 8-bit codes, not {weight.bits}-bit"
    if weight.in_features % weight.group_size or weight.group_size % 32:
        return f"group size {weight.group_size} must be a multiple of 32 dividing the input features"
    return None


class Int8DynamicLinear(PackedLayer):
    """W8A8: int8 weights (per output channel) × int8 activations, integer GEMM, float rescale.

    ``act_scale`` ``None`` quantizes each token's activations on the fly (per-token
    dynamic); a scalar tensor is a static per-tensor scale from calibration.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 act_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        scales = (weight.detach().abs().amax(1).float() / 127.0).clamp(min=1e-8)
        qweight = torch.round(weight.detach().float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("w_scales", scales)
        self.register_buffer("act_scale", None if act_scale is None else act_scale.float().reshape(()))
        self.bias = _bias(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = kernels.w8a8_mm(x, self.qweight.t(), self.w_scales, self.act_scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.w_scales.to(dtype)[:, None]

    def path(self) -> str:
        scheme = "per-token dynamic" if self.act_scale is None else "static per-tensor"
        return f"int8×int8 GEMM ({kernels.INT8_GEMM_PATHS[kernels.int8_gemm_path()]}, {scheme} activations)"

    @classmethod
    def from_export(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Int8DynamicLinear:
        layer = cls(torch.zeros(meta["out_features"], meta["in_features"]), tensors.get("bias"),
                    tensors.get("act_scale"))
        layer.qweight.copy_(tensors["qweight"])
        layer.w_scales.copy_(tensors["w_scales"])
        return layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, path={self.path()}"


class OutlierInt8Linear(PackedLayer):
    """LLM.int8(): vector-wise int8 matmul with outlier input features in higher precision.

    Input features in ``outliers`` (found on calibration data) keep their weight columns
    in float16 and are multiplied in float; the other columns are int8 with one scale per
    output row, multiplied with per-token int8 activations. With ``runtime_threshold``,
    a feature whose magnitude exceeds it in the current batch is also taken out of the
    int8 product (its int8 weight column is dequantized), as the paper's decomposition
    does at inference time.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, outliers: torch.Tensor,
                 runtime_threshold: float | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.runtime_threshold = runtime_threshold
        outliers = outliers.to(torch.long).flatten().sort().values
        inliers = weight.detach().float().clone()
        inliers[:, outliers] = 0.0
        scales = (inliers.abs().amax(1) / 127.0).clamp(min=1e-8)
        self.register_buffer("qweight", torch.round(inliers / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("w_scales", scales)
        self.register_buffer("outliers", outliers)
        self.register_buffer("outlier_weight", weight.detach()[:, outliers].half().contiguous())
        self.bias = _bias(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).float()
        out = flat[:, self.outliers] @ self.outlier_weight.float().t()
        inliers = flat.clone()
        inliers[:, self.outliers] = 0.0
        if self.runtime_threshold is not None:
            dynamic = (inliers.abs() > self.runtime_threshold).any(0).nonzero().flatten()
            if dynamic.numel():
                dense = self.qweight[:, dynamic].float() * self.w_scales[:, None]
                out = out + inliers[:, dynamic] @ dense.t()
                inliers[:, dynamic] = 0.0
        out = out + kernels.w8a8_mm(inliers, self.qweight.t(), self.w_scales)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def path(self) -> str:
        gemm = kernels.INT8_GEMM_PATHS[kernels.int8_gemm_path()]
        return f"int8×int8 GEMM ({gemm}) + outlier features in float16"  # counts: the technique's note

    def metadata(self) -> dict[str, Any]:
        return super().metadata() | {"runtime_threshold": self.runtime_threshold}

    @classmethod
    def from_export(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> OutlierInt8Linear:
        layer = cls(torch.zeros(meta["out_features"], meta["in_features"]), tensors.get("bias"),
                    tensors["outliers"], meta.get("runtime_threshold"))
        for name in ("qweight", "w_scales", "outlier_weight"):
            getattr(layer, name).copy_(tensors[name])
        return layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, path={self.path()}"


def packed_layers(model: nn.Module) -> dict[str, PackedLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, PackedLayer)}


def summarize_paths(layers: dict[str, PackedLayer]) -> str:
    """``"12 × int4 packed kernel, 2 × int4 dequantize-per-call"``."""
    counts: dict[str, int] = {}
    for layer in layers.values():
        counts[layer.path()] = counts.get(layer.path(), 0) + 1
    return ", ".join(f"{n} × {path}" for path, n in counts.items()) or "no layers"
