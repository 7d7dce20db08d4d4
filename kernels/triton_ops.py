"""Triton implementations (imported lazily by :func:`effinfer.kernels.dispatch.triton_kernels`).

On a CUDA device these compile for the GPU; on a CPU-only machine they run in Triton's
interpreter (``TRITON_INTERPRET=1``), which is how CI checks them against :mod:`.reference`.

- ``_dequant_matmul_kernel``: W8A16 / W4A16 / W2A16 dequantize-and-multiply on the packed layout;
  a GEMV form (broadcast multiply-and-sum, no tensor cores) for up to ``GEMV_ROWS`` tokens (decode)
  and a ``tl.dot`` GEMM form for prefill. Codes are read as bytes and shifted in registers; the
  group's scale and bias are read once per K-block when the block lies inside one group.
- ``_decode_attention_kernel``: split-K flash-decoding (Dao et al., 2023): each program handles
  one KV head, all the query heads that share it (GQA), and one split of the cache; a second
  step merges the splits' partial outputs by their log-sum-exp. Static ``[B, H, T, D]`` caches
  and paged ones (``[blocks, H, block_size, D]`` + block table, as vLLM's PagedAttention) share it.
- ``_add_rmsnorm_kernel``: residual add + RMSNorm in one pass over the row (Zhang & Sennrich, 2019).
- ``_rotary_kv_kernel``: rotary embedding (Su et al., RoFormer, 2021) of q and k, with k and v
  written straight into the cache at their positions.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from effinfer.kernels.packed import BYTE_ALIGNED_BITS, PackedWeight

GEMV_ROWS = 8


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# --------------------------------------------------------------------------- dequantize-and-multiply


@triton.jit
def _dequant_matmul_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, k_per_split, row_bytes, n_groups,
                           stride_xm, stride_ym, BITS: tl.constexpr, GROUP: tl.constexpr,
                           GROUP_ALIGNED: tl.constexpr, USE_DOT: tl.constexpr, SPLIT_K: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    PER_BYTE: tl.constexpr = 8 // BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = n_mask[:, None] & k_mask[None, :]
        byte = tl.load(w_ptr + rn[:, None] * row_bytes + rk[None, :] // PER_BYTE, mask=w_mask, other=0)
        code = (byte.to(tl.int32) >> ((rk[None, :] % PER_BYTE) * BITS)) & ((1 << BITS) - 1)
        if GROUP_ALIGNED:  # the whole K-block lies in one group: one scale and bias per output row
            group = k0 // GROUP
            scale = tl.load(s_ptr + rn * n_groups + group, mask=n_mask, other=0.0)[:, None]
            bias = tl.load(b_ptr + rn * n_groups + group, mask=n_mask, other=0.0)[:, None]
        else:
            groups = rk[None, :] // GROUP
            scale = tl.load(s_ptr + rn[:, None] * n_groups + groups, mask=w_mask, other=0.0)
            bias = tl.load(b_ptr + rn[:, None] * n_groups + groups, mask=w_mask, other=0.0)
        w = code.to(tl.float32) * scale + bias                                        # BLOCK_N × BLOCK_K
        if USE_DOT:
            acc += tl.dot(x.to(x_ptr.dtype.element_ty), tl.trans(w.to(x_ptr.dtype.element_ty)))
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:  # split-K: each split adds its partial sum into a float32 output
        tl.atomic_add(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=y_mask)
    else:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _split_k(programs: int, k_blocks: int, device: torch.device) -> int:
    """Splits of K that give a decode GEMV about two programs per SM (1 in the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), k_blocks // 2, 16))


def dequant_matmul(x: torch.Tensor, weight: PackedWeight, split_k: int | None = None) -> torch.Tensor:
    """``x @ W.T``; ``split_k`` (default: chosen per device for decode, 1 for prefill) splits the reduction."""
    if weight.bits not in BYTE_ALIGNED_BITS:
        raise ValueError(f"the Triton dequant matmul reads {BYTE_ALIGNED_BITS}-bit codes (got {weight.bits}-bit); "
                         "use the cpu or reference backend for other widths")
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    rows, k = flat.shape
    n = weight.out_features
    gemv = rows <= GEMV_ROWS
    block_m = _pow2(rows) if gemv else (16 if rows <= 16 else 32 if rows <= 32 else 64)
    block_k = 64 if gemv else 32
    while block_k > 16 and weight.group_size % block_k:
        block_k //= 2
    # the GEMV multiplies a BLOCK_M × BLOCK_N × BLOCK_K product in registers: keep it at 8K elements
    block_n = max(16, 8192 // (block_m * block_k)) if gemv else 64
    aligned = weight.group_size % block_k == 0
    programs = triton.cdiv(rows, block_m) * triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    if split_k is None:
        split_k = _split_k(programs, k_blocks, x.device) if gemv else 1
    split_k = max(1, min(split_k, k_blocks))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = (torch.zeros(rows, n, dtype=torch.float32, device=x.device) if split_k > 1
           else torch.empty(rows, n, dtype=x.dtype, device=x.device))
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n), split_k)
    _dequant_matmul_kernel[grid](flat, weight.packed, weight.scales, weight.bias, out, rows, n, k, k_per_split,
                                 weight.packed.shape[1], weight.scales.shape[1], flat.stride(0), out.stride(0),
                                 BITS=weight.bits, GROUP=weight.group_size, GROUP_ALIGNED=aligned,
                                 USE_DOT=not gemv, SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n,
                                 BLOCK_K=block_k)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


# --------------------------------------------------------------------------- flash-decoding attention


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, len_ptr, table_ptr, o_ptr, lse_ptr,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                             stride_table, n_splits, split_len, scale, GROUPS, HEAD_DIM,
                             PAGED: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    rh = tl.arange(0, BLOCK_H)
    rd = tl.arange(0, BLOCK_D)
    h_mask = rh < GROUPS
    d_mask = rd < HEAD_DIM
    heads = kv_head * GROUPS + rh
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + rd[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    length = tl.load(len_ptr + b)
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    m = tl.zeros((BLOCK_H,), dtype=tl.float32) - float("inf")
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        t_mask = rt < end
        if PAGED:
            page = tl.load(table_ptr + b * stride_table + rt // PAGE, mask=t_mask, other=0)
            k_off = page * stride_kb + kv_head * stride_kh + (rt % PAGE) * stride_kt
            v_off = page * stride_vb + kv_head * stride_vh + (rt % PAGE) * stride_vt
        else:
            k_off = b * stride_kb + kv_head * stride_kh + rt * stride_kt
            v_off = b * stride_vb + kv_head * stride_vh + rt * stride_vt
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + k_off[:, None] + rd[None, :], mask=kv_mask, other=0.0).to(tl.float32)   # T × D
        v = tl.load(v_ptr + v_off[:, None] + rd[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale                               # H × T
        scores = tl.where(t_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    empty = l == 0.0
    out = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
    row = (b * tl.num_programs(1) * GROUPS + heads) * n_splits + split
    tl.store(o_ptr + row[:, None] * HEAD_DIM + rd[None, :], out, mask=h_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + row, lse, mask=h_mask)


def _decode_attention(q, k, v, lengths, table, page, scale, max_len):
    batch, heads, dim = q.shape
    heads_kv = k.shape[1]
    if heads % heads_kv:
        raise ValueError(f"{heads} query heads do not share {heads_kv} KV heads evenly")
    groups = heads // heads_kv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    # enough splits to give the GPU ~2 programs per SM at batch 1, each at least 256 positions long
    split_len = max(256, _pow2(triton.cdiv(max_len, 16)))
    n_splits = triton.cdiv(max_len, split_len)
    partial = torch.empty(batch, heads, n_splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, n_splits, dtype=torch.float32, device=q.device)
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    q = q.contiguous()
    table_arg = table if table is not None else lengths
    block_h, block_d = max(1, _pow2(groups)), _pow2(dim)
    _decode_attention_kernel[(batch, heads_kv, n_splits)](
        q, k, v, lengths, table_arg, partial, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), table_arg.stride(0), n_splits, split_len, scale, groups, dim,
        PAGED=table is not None, PAGE=page, BLOCK_H=block_h, BLOCK_D=block_d,
        BLOCK_T=max(8, min(64, 8192 // (block_h * block_d))))  # H × T × D product: ≤ 8K register elements
    weights = torch.softmax(lse, dim=-1).nan_to_num_(0.0)
    return (partial * weights.unsqueeze(-1)).sum(2).to(q.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache must be contiguous in its last (head) dimension")
    return _decode_attention(q, k_cache, v_cache, lengths, None, 1, scale, k_cache.shape[2])


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                           lengths: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    page = k_pages.shape[2]
    table = block_table.to(device=q.device, dtype=torch.int32).contiguous()
    return _decode_attention(q, k_pages, v_pages, lengths, table, page, scale, table.shape[1] * page)


# --------------------------------------------------------------------------- residual add + RMSNorm


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, N, eps, offset, stride_x, stride_r,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(h_ptr + row * N + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    tl.store(y_ptr + row * N + cols, (h * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-6,
                offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    flat = x.reshape(-1, n)
    res = flat if residual is None else residual.reshape(-1, n)
    if flat.stride(-1) != 1 or res.stride(-1) != 1:
        flat, res = flat.contiguous(), res.contiguous()
    out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
    hidden = torch.empty_like(out) if residual is not None else x
    _add_rmsnorm_kernel[(flat.shape[0],)](flat, res, weight, out, hidden, n, eps, offset, flat.stride(0),
                                          res.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=_pow2(n))
    return out.view(x.shape), hidden.view(x.shape)


# --------------------------------------------------------------------------- rotary + KV write


@triton.jit
def _rotary_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr, L, HQ,
                      sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sc_b, sc_l,
                      skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, so_b, so_h, so_l,
                      HALF: tl.constexpr, BLOCK: tl.constexpr):
    bl = tl.program_id(0)
    head = tl.program_id(1)
    b = bl // L
    l = bl % L
    d = tl.arange(0, BLOCK)
    mask = d < HALF
    c1 = tl.load(cos_ptr + b * sc_b + l * sc_l + d, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + b * sc_b + l * sc_l + HALF + d, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + b * sc_b + l * sc_l + d, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + b * sc_b + l * sc_l + HALF + d, mask=mask, other=0.0).to(tl.float32)
    if head < HQ:
        src = q_ptr + b * sq_b + head * sq_h + l * sq_l
        x1 = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + d, mask=mask, other=0.0).to(tl.float32)
        dst = qo_ptr + b * so_b + head * so_h + l * so_l
        tl.store(dst + d, (x1 * c1 - x2 * s1).to(qo_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + d, (x2 * c2 + x1 * s2).to(qo_ptr.dtype.element_ty), mask=mask)
    else:
        kv = head - HQ
        pos = tl.load(pos_ptr + l)
        src = k_ptr + b * sk_b + kv * sk_h + l * sk_l
        x1 = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + d, mask=mask, other=0.0).to(tl.float32)
        dst = kc_ptr + b * skc_b + kv * skc_h + pos * skc_t
        tl.store(dst + d, (x1 * c1 - x2 * s1).to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + d, (x2 * c2 + x1 * s2).to(kc_ptr.dtype.element_ty), mask=mask)
        vsrc = v_ptr + b * sv_b + kv * sv_h + l * sv_l
        vdst = vc_ptr + b * svc_b + kv * svc_h + pos * svc_t
        tl.store(vdst + d, tl.load(vsrc + d, mask=mask, other=0.0).to(vc_ptr.dtype.element_ty), mask=mask)
        tl.store(vdst + HALF + d, tl.load(vsrc + HALF + d, mask=mask, other=0.0).to(vc_ptr.dtype.element_ty),
                 mask=mask)


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = q.shape
    if dim % 2:
        raise ValueError(f"rotary embedding needs an even head dimension (got {dim})")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    cos, sin = cos.expand(batch, length, dim).contiguous(), sin.expand(batch, length, dim).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    positions = positions.to(device=q.device, dtype=torch.int32).contiguous()
    _rotary_kv_kernel[(batch * length, heads + k.shape[1])](
        q, k, v, cos, sin, out, k_cache, v_cache, positions, length, heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos.stride(0), cos.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2), HALF=dim // 2, BLOCK=_pow2(dim // 2))
    return out
