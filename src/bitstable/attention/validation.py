"""Argument checks for the attention API: clear errors instead of wrong answers.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong
device, shape or value) naming the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from .._backend import interpreting, kernel_device_type
from ..configs import MAX_HEAD_DIM

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_qkv(q, k, v, names: Tuple[str, str, str] = ("q", "k", "v"), check_batch: bool = True,
              any_head_dim: bool = False, smaller_v: Optional[bool] = None) -> None:
    """q [B, Lq, Hq, D], k [B, Lk, Hkv, D], v [B, Lk, Hkv, Dv]; one dtype, one device;
    Hq % Hkv == 0.  Dv == D, except with ``any_head_dim`` where 1 <= Dv <= D (the caller
    zero-pads v to D: a value head dim other than q/k's, as in DeepSeek's MLA prefill).

    ``names``: how the caller's user wrote the three arguments (the KV-cache API passes
    ``("q", "k_cache", "v_cache")``), used in every message.  ``check_batch`` False: k/v's
    first dim is not q's batch (a KV cache's rows or pages) and is not compared.
    ``any_head_dim``: accept any head dim in [1, MAX_HEAD_DIM] (the caller zero-pads one
    that is not a multiple of 8, :func:`padded_to_multiple_of_8`); else multiples of 8 only.
    ``smaller_v`` (default: ``any_head_dim``): whether v's head dim may be below q/k's.
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
    if smaller_v is None:
        smaller_v = any_head_dim
    if smaller_v and k.shape[:3] == v.shape[:3] and k.shape[3] != v.shape[3]:
        if not 1 <= v.shape[3] <= k.shape[3]:
            raise ValueError(f"{nv} head dim (value head dim) must be in [1, {nk}'s head dim "
                             f"{k.shape[3]}], got {v.shape[3]}")
    elif k.shape != v.shape:
        raise ValueError(f"{nk} and {nv} must have the same shape, got {nk} {tuple(k.shape)}, "
                         f"{nv} {tuple(v.shape)}")
    Bk, Lk, Hk, Dk = k.shape
    if check_batch and Bk != B:
        raise ValueError(f"{nkv} batch size {Bk} does not match {nq}'s {B}")
    if Dk != D:
        raise ValueError(f"{nkv} head dim {Dk} does not match {nq}'s {D}")
    if any_head_dim:
        if D < 1 or D > MAX_HEAD_DIM:
            raise ValueError(f"head dim ({nq}.shape[-1]) must be in [1, {MAX_HEAD_DIM}] (head dims "
                             f"that are not a multiple of 8 are zero-padded inside), got {D}")
    elif D % 8 != 0 or D < 8 or D > MAX_HEAD_DIM:
        raise ValueError(f"head dim ({nq}.shape[-1]) must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {D}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"number of {nq} heads ({Hq}) must be a multiple of the number of {nkv} heads ({Hk})")


def check_options(q, dropout_p, softmax_scale, window_size, softcap, alibi_slopes,
                  ) -> Tuple[float, int, int]:
    """Check the scalar options; returns (softmax_scale, window_left, window_right)."""
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    left, right = check_window_size(window_size)
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


def _window_entry(w):
    """One window_size entry as a Python int, or None if it is not an integer."""
    if isinstance(w, bool):
        return None
    if isinstance(w, numbers.Integral):
        return int(w)
    if (isinstance(w, torch.Tensor) and w.dim() == 0 and not w.is_floating_point()
            and not w.is_complex() and w.dtype != torch.bool):
        return int(w.item())
    return None


def check_window_size(window_size) -> Tuple[int, int]:
    """``window_size`` as flash-attn accepts it: a tuple or list of two ints (0-d integer
    tensors allowed as entries) or a 2-element integer tensor (read on the host, one
    sync if it lives on a GPU).  Returns ``(left, right)`` as Python ints, each >= -1
    (-1: unbounded).  Anything else raises ``TypeError`` / ``ValueError`` naming
    ``window_size``."""
    if type(window_size) is tuple and len(window_size) == 2:     # the common form, checked cheaply
        left, right = window_size
        if type(left) is int and type(right) is int and left >= -1 and right >= -1:
            return left, right
    entries = None
    if isinstance(window_size, torch.Tensor):
        if (window_size.numel() == 2 and window_size.dim() <= 1 and not window_size.is_floating_point()
                and not window_size.is_complex() and window_size.dtype != torch.bool):
            entries = [int(w) for w in window_size.tolist()]
    elif isinstance(window_size, (tuple, list)) and len(window_size) == 2:
        entries = [_window_entry(w) for w in window_size]
        if None in entries:
            entries = None
    if entries is None:
        what = (f"a {window_size.dtype} tensor of shape {tuple(window_size.shape)}"
                if isinstance(window_size, torch.Tensor) else repr(window_size))
        raise TypeError(f"window_size must be a pair of ints (left, right): a tuple, a list or a "
                        f"2-element integer tensor, got {what}")
    left, right = entries
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 means unbounded), got ({left}, {right})")
    return left, right


def padded_to_multiple_of_8(head_dim: int) -> int:
    """The head dim the kernels run at for a user's ``head_dim``: the next multiple of 8
    (the inputs are zero-padded up to it, as flash-attn does; the extra zeros add exact
    zeros to every dot product, so only the padded copies cost anything)."""
    return (head_dim + 7) // 8 * 8


def pad_head_dim(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``t`` zero-padded on its last dim to ``head_dim`` (differentiable: the gradient of
    the padded copy is sliced back to ``t``'s shape by autograd)."""
    extra = head_dim - t.shape[-1]
    return t if extra == 0 else torch.nn.functional.pad(t, (0, extra))


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


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 names: Tuple[str, str, str] = ("q", "k", "v"),
                 cu_names: Tuple[str, str] = ("cu_seqlens_q", "cu_seqlens_k"),
                 max_names: Tuple[str, str] = ("max_seqlen_q", "max_seqlen_k"),
                 any_head_dim: bool = False, paged: bool = False):
    """Packed q [total_q, Hq, D], k/v [total_k, Hkv, D] and their int32 cu_seqlens.

    Reads cu_seqlens on the host (one synchronisation) to check that they start
    at 0, never decrease, end at the packed lengths and fit max_seqlen_q/k.
    ``names`` / ``cu_names`` / ``max_names``: the arguments as the user wrote them (the
    packed variants pass slices of ``qkv`` / ``kv`` and ``cu_seqlens`` / ``max_seqlen``).
    ``paged``: k/v are pages [num_blocks, page_size, Hkv, D] (``block_table``), so
    cu_seqlens_k's total is not k's first dim and is not compared with it.
    Returns the host copies ``(cu_seqlens_q, cu_seqlens_k)`` as lists.
    """
    nq, nk, nv = names
    for name, t in ((nq, q), (nk, k), (nv, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    kv_dims, kv_shape = (4, "(num_blocks, page_size, heads, headdim) with block_table") if paged else (
        3, "(total_tokens, heads, headdim) for the varlen API")
    for name, t, dims, shape in ((nq, q, 3, "(total_tokens, heads, headdim) for the varlen API"),
                                 (nk, k, kv_dims, kv_shape), (nv, v, kv_dims, kv_shape)):
        if t.dim() != dims:
            raise ValueError(f"{name} must have shape {shape}, got {t.dim()} dims {tuple(t.shape)}")
    if paged:
        check_qkv(q.unsqueeze(0), k, v, names=names, check_batch=False, any_head_dim=any_head_dim)
    else:
        check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), names=names,
                  any_head_dim=any_head_dim)
    cq_name, ck_name = cu_names
    mq_name, mk_name = max_names
    for name, cu in ((cq_name, cu_seqlens_q), (ck_name, cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be 1-d with num_seqs + 1 >= 2 entries, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device}, expected {nq}'s device {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{cq_name} and {ck_name} must have the same length (num_seqs + 1), "
                         f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    for name, m in ((mq_name, max_seqlen_q), (mk_name, max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise TypeError(f"{name} must be a non-negative int, got {m!r}")
    hosts = []
    for name, cu, total, mx, mname in (
            (cq_name, cu_seqlens_q, q.shape[0], max_seqlen_q, mq_name),
            (ck_name, cu_seqlens_k, None if paged else k.shape[0], max_seqlen_k, mk_name)):
        host = list(hosts[0]) if (hosts and cu is cu_seqlens_q) else cu.tolist()
        hosts.append(host)
        if host[0] != 0:
            raise ValueError(f"{name} must start at 0, got {host[0]}")
        lens = [b - a for a, b in zip(host[:-1], host[1:])]
        if min(lens) < 0:
            raise ValueError(f"{name} must be non-decreasing (monotonic), got {host}")
        if total is not None and host[-1] != total:
            raise ValueError(f"{name} must end at the packed length {total}, got {host[-1]}")
        if max(lens) > mx:
            raise ValueError(f"{mname}={mx} is smaller than the longest sequence ({max(lens)})")
    return hosts[0], hosts[1]


def check_block_table(block_table, k, v, num_seqs: int, seqlens_k, names: Tuple[str, str] = ("k", "v")):
    """``block_table`` int32 [num_seqs, max_pages] of pages of k/v [num_blocks, page_size,
    Hkv, D]: page_size a multiple of 16, enough pages for each sequence's keys
    (``seqlens_k``, host ints), every used page index in [0, num_blocks).  Reads the
    table on the host (one synchronisation).  Returns ``(page_size, table)``, the table
    as nested lists."""
    nk, nv = names
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor or None, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != num_seqs:
        raise ValueError(f"block_table must have shape (num_seqs={num_seqs}, max_pages_per_seq), "
                         f"got {tuple(block_table.shape)}")
    if block_table.device != k.device:
        raise ValueError(f"block_table is on {block_table.device}, expected {nk}'s device {k.device}")
    num_blocks, page_size = k.shape[0], k.shape[1]
    if page_size == 0 or page_size % 16 != 0:
        raise ValueError(f"page size ({nk}.shape[1]) must be a positive multiple of 16 with "
                         f"block_table, got {page_size}")
    max_pages = block_table.shape[1]
    table = block_table.tolist()
    for i, n in enumerate(seqlens_k):
        need = -(-n // page_size)
        if need > max_pages:
            raise ValueError(f"sequence {i} has {n} keys, which needs {need} pages of {page_size}, "
                             f"but block_table has {max_pages} pages per sequence")
        used = table[i][:need]
        if used and (min(used) < 0 or max(used) >= num_blocks):
            raise ValueError(f"block_table[{i}] holds page index {min(used) if min(used) < 0 else max(used)}"
                             f" outside [0, {num_blocks}) ({nk}/{nv} have {num_blocks} pages)")
    return page_size, table
