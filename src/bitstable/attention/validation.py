"""Argument checks for the attention API: clear errors instead of wrong answers.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong
device, shape or value) naming the argument and what was expected.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from .._backend import interpreting, kernel_device_type
from ..configs import MAX_HEAD_DIM

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_qkv(q, k, v, names: Tuple[str, str, str] = ("q", "k", "v"), check_batch: bool = True) -> None:
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; one dtype, one device; Hq % Hkv == 0.

    ``names``: how the caller's user wrote the three arguments (the KV-cache API passes
    ``("q", "k_cache", "v_cache")``), used in every message.  ``check_batch`` False: k/v's
    first dim is not q's batch (a KV cache's rows or pages) and is not compared.
    """
    nq, nk, nv = names
    nkv = f"{nk}/{nv}"
    for name, t in ((nq, q), (nk, k), (nv, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seqlen, heads, headdim), "
                             f"got {t.dim()} dims {tuple(t.shape)}")
    for name, t in ((nk, k), (nv, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match {nq}'s {q.dtype} ({nq}, {nk}, {nv} must "
                            f"share one dtype, got {nq} {q.dtype}, {nk} {k.dtype}, {nv} {v.dtype})")
    want = kernel_device_type()
    for name, t in ((nq, q), (nk, k), (nv, v)):
        if t.device.type != want:
            where = ("Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors"
                     if interpreting() else "bitstable's kernels run on CUDA tensors")
            raise ValueError(f"{name} is on {t.device}, but {where}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{nq}, {nk}, {nv} must be on one device, got {nq} {q.device}, {nk} {k.device}, "
                         f"{nv} {v.device}")
    B, Lq, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{nk} and {nv} must have the same shape, got {nk} {tuple(k.shape)}, "
                         f"{nv} {tuple(v.shape)}")
    Bk, Lk, Hk, Dk = k.shape
    if check_batch and Bk != B:
        raise ValueError(f"{nkv} batch size {Bk} does not match {nq}'s {B}")
    if Dk != D:
        raise ValueError(f"{nkv} head dim {Dk} does not match {nq}'s {D}")
    if D % 8 != 0 or D < 8 or D > MAX_HEAD_DIM:
        raise ValueError(f"head dim ({nq}.shape[-1]) must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {D}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"number of {nq} heads ({Hq}) must be a multiple of the number of {nkv} heads ({Hk})")


def check_options(q, dropout_p, softmax_scale, window_size, softcap, alibi_slopes,
                  ) -> Tuple[float, int, int]:
    """Check the scalar options; returns (softmax_scale, window_left, window_right)."""
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"dropout_p={dropout_p}: bitstable's attention does not implement dropout yet; "
            "pass dropout_p=0.0")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 means unbounded), got {window_size!r}")
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if softcap < 0 or not math.isfinite(softcap):
        raise ValueError(f"softcap must be >= 0 and finite (0 disables it), got {softcap}")
    if alibi_slopes is not None:
        B, _, Hq, _ = q.shape
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, expected q's device {q.device}")
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise ValueError(f"alibi_slopes must have shape ({Hq},) or ({B}, {Hq}), "
                             f"got {tuple(alibi_slopes.shape)}")
    return float(softmax_scale), left, right


def normalize_window(causal: bool, left: int, right: int, seqlen_k: int) -> Tuple[int, int]:
    """flash-attn's convention: causal means right = 0; -1 means unbounded.

    A left window as large as the keys is the same as no left window.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal:
        right = 0
    if left >= seqlen_k:
        left = -1
    return left, right


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels need unit stride on the head dim; any other strides are fine."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """Packed q [total_q, Hq, D], k/v [total_k, Hkv, D] and their int32 cu_seqlens.

    Reads cu_seqlens on the host (one synchronisation) to check that they start
    at 0, never decrease, end at the packed lengths and fit max_seqlen_q/k.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dim() != 3:
            raise ValueError(f"{name} must have shape (total_tokens, heads, headdim) for the varlen "
                             f"API, got {t.dim()} dims {tuple(t.shape)}")
    check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be 1-d with num_seqs + 1 >= 2 entries, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device}, expected q's device {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (num_seqs + 1), "
                         f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise TypeError(f"{name} must be a non-negative int, got {m!r}")
    for name, cu, total, mx, mname in (
            ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q"),
            ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")):
        host = cu.tolist()
        if host[0] != 0:
            raise ValueError(f"{name} must start at 0, got {host[0]}")
        lens = [b - a for a, b in zip(host[:-1], host[1:])]
        if min(lens) < 0:
            raise ValueError(f"{name} must be non-decreasing (monotonic), got {host}")
        if host[-1] != total:
            raise ValueError(f"{name} must end at the packed length {total}, got {host[-1]}")
        if max(lens) > mx:
            raise ValueError(f"{mname}={mx} is smaller than the longest sequence ({max(lens)})")
