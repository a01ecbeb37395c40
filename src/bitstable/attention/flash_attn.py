"""``flash_attn_func``: flash-attn's signature, bitwise-reproducible forward.

Switching from flash-attn is an import change::

    from bitstable import flash_attn_func   # was: from flash_attn import flash_attn_func
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..mode import get_deterministic_mode
from ..reference import alibi_bias, attention_reference, visibility
from .dropout import Dropout, check_dropout_seeds, draw_stream, keep_mask, returned_probs
from .ops import attention, varlen_attention
from .sinks import apply_learnable_sink, check_learnable_sink
from .validation import (check_block_table, check_options, check_qkv, check_varlen, normalize_window,
                         pad_head_dim, padded_to_multiple_of_8)


def _stock_attention(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes,
                     need_lse: bool = True):
    """Stock PyTorch: SDPA (with a mask for windows, bottom-right causal and ALiBi),
    eager math where SDPA cannot express the call (softcap).  SDPA returns no
    log-sum-exp, so it is computed by eager math only when ``need_lse``."""
    B, Lq, Hq, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    if softcap > 0:
        out, lse = attention_reference(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes)
        return out, lse.float()
    lse = None
    if need_lse:
        _, lse = attention_reference(q, k, v, softmax_scale, causal, window_size, softcap,
                                     alibi_slopes, compute_dtype=torch.float32)
    left, right = window_size
    mask, is_causal = None, False
    if left >= 0 or right >= 0 or (causal and Lq != Lk):
        mask = visibility(Lq, Lk, causal, window_size, q.device)
    elif causal:
        is_causal = True
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, B, Hq, Lq, Lk, q.dtype)
        if causal:
            mask = visibility(Lq, Lk, causal, window_size, q.device) if mask is None else mask
            is_causal = False
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=is_causal, scale=softmax_scale, enable_gqa=Hq != Hk)
    return out.transpose(1, 2), lse


def padded_for_kernels(q, k, v):
    """(q, k, v, Dv): the three zero-padded on the head dim to what the kernels run at, one
    head dim for all three: q/k's head dim D rounded up to a multiple of 8 (flash-attn pads
    the same way), v from its own Dv <= D up to that too.  The padded columns of q and k add
    exact zeros to every score; those of v give output columns that are sliced off (out keeps
    Dv).  softmax_scale must already be resolved from the unpadded D.  Differentiable: the
    gradients are sliced back to the inputs' shapes.  Cost where padding happens: one padded
    copy of each tensor per call, and the P @ V product at D instead of Dv."""
    D, Dv = q.shape[-1], v.shape[-1]
    Dp = padded_to_multiple_of_8(D)
    if Dp != D:
        q, k = pad_head_dim(q, Dp), pad_head_dim(k, Dp)
    if Dv != Dp:
        v = pad_head_dim(v, Dp)
    return q, k, v, Dv


def _finish(out, lse, learnable_sink, return_attn_probs, probs=None):
    """The public return value of the dense and varlen calls, every path alike: the sink
    applied to (out, lse) if there is one, then ``out`` or ``(out, lse, probs)`` (``probs``:
    flash-attn's S_dmask under dropout, else None)."""
    if learnable_sink is not None:
        out, lse = apply_learnable_sink(out, lse, learnable_sink)
    return (out, lse, probs) if return_attn_probs else out


def _dropout(dropout_p: float, dropout_seeds, q: torch.Tensor, batch: int, nheads: int):
    """The call's Dropout (None for dropout_p 0): ``dropout_seeds`` checked, then the stream
    key drawn from torch's generator (which advances).  Called after every other check."""
    seeds = check_dropout_seeds(dropout_seeds, dropout_p, batch, q.device)
    if dropout_p == 0.0:
        return None
    return Dropout(float(dropout_p), draw_stream(q.device, batch, nheads), seeds)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def dense_attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    return_attn_probs, names=("q", "k", "v"), learnable_sink=None, dropout_seeds=None):
    """flash_attn_func's body; ``names``: q, k, v as the user wrote them (the packed
    variants pass slices of ``qkv`` / ``kv``).  Every check comes before any work."""
    check_qkv(q, k, v, names=names, any_head_dim=True)
    softmax_scale, left, right = check_options(q, dropout_p, softmax_scale, window_size,
                                               softcap, alibi_slopes)
    _check_bool("return_attn_probs", return_attn_probs)
    check_learnable_sink(learnable_sink, q, q.shape[2])
    window = (left, right)          # as Python ints, whatever form the user gave
    left, right = normalize_window(causal, left, right, k.shape[1])
    B, Lq, Hq = q.shape[:3]
    dropout = _dropout(dropout_p, dropout_seeds, q, B, Hq)
    keep = (keep_mask(dropout, B, Hq, Lq, k.shape[1], q.device)
            if dropout is not None and (return_attn_probs or not get_deterministic_mode().enabled) else None)
    probs = (returned_probs(q, k, softmax_scale, causal, window, softcap, alibi_slopes, keep)
             if dropout is not None and return_attn_probs else None)

    if not get_deterministic_mode().enabled:
        if dropout is not None:    # eager math with the kernels' mask
            out, _ = attention_reference(q, k, v, softmax_scale, causal, window, softcap, alibi_slopes,
                                         dropout_mask=keep, dropout_p=dropout.p)
            lse = None     # float32, as _stock_attention's, and only when asked for
            if return_attn_probs or learnable_sink is not None:
                _, lse = attention_reference(q, k, v, softmax_scale, causal, window, softcap,
                                             alibi_slopes, compute_dtype=torch.float32)
        else:
            out, lse = _stock_attention(q, k, v, softmax_scale, causal, window, softcap, alibi_slopes,
                                        need_lse=return_attn_probs or learnable_sink is not None)
    else:
        q, k, v, Dv = padded_for_kernels(q, k, v)
        out, lse = attention(q, k, v, softmax_scale, left, right, float(softcap), alibi_slopes,
                             get_deterministic_mode().split_size, dropout)
        out = out[..., :Dv] if out.shape[-1] != Dv else out
    return _finish(out, lse, learnable_sink, return_attn_probs, probs)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = True,
                    return_attn_probs: bool = False, *, learnable_sink: Optional[torch.Tensor] = None,
                    dropout_seeds: Optional[torch.Tensor] = None):
    """Scaled dot-product attention, bitwise reproducible.

    Args (flash-attn's names and meanings):
        q: (batch, seqlen_q, nheads, headdim), bfloat16 / float16 / float32.
        k: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (GQA/MQA).
            headdim: any size from 1 to 256.  One that is not a multiple of 8 is
            zero-padded inside to the next multiple of 8 (as flash-attn does: one
            padded copy of q, k, v per call); out and the gradients keep the
            inputs' shapes.
        v: (batch, seqlen_k, nheads_k, headdim_v), headdim_v <= headdim (e.g. 128
            with q/k at 192, DeepSeek's MLA prefill); v is zero-padded inside to
            q/k's (padded) head dim, so P @ V runs at headdim, not headdim_v.
        dropout_p: dropout probability in [0, 1) on the attention weights (flash-attn's:
            dropped weights are zeroed, kept ones scaled by 1 / (1 - p); the lse is the
            undropped softmax's).  The keep-mask is a pure function of torch's generator
            seed and offset (as flash-attn takes them: ``torch.manual_seed`` replays it),
            the sequence's key (its batch index, or ``dropout_seeds``), the head and the
            absolute (query, key) positions; the backward uses the same mask.  See
            attention/dropout.py and the README.
        softmax_scale: defaults to 1 / sqrt(headdim) (the unpadded headdim).
        causal: causal mask aligned to the bottom-right corner (FlashAttention 2).
        window_size: (left, right) sliding window; -1 is unbounded.  A tuple, a
            list or a 2-element integer tensor (read on the host).
        softcap: if > 0, scores become softcap * tanh(scores / softcap).
        alibi_slopes: (nheads,) or (batch, nheads) float32; adds
            -slope * |i + seqlen_k - seqlen_q - j| to the score of query i, key j.
        deterministic: accepted for compatibility; bitstable's forward and backward
            are always deterministic.
        return_attn_probs: if True, also return the softmax log-sum-exp
            (batch, nheads, seqlen_q) float32 and, with dropout, flash-attn's ``S_dmask``
            (batch, nheads, seqlen_q, seqlen_k) in q's dtype: ``exp(logit - row max)``
            with the dropped entries negated (a debugging output, computed apart from the
            kernels, O(seqlen_q * seqlen_k) memory); ``None`` without dropout.
        learnable_sink: keyword-only, (nheads,) float32 or None (FlashAttention 4's
            argument; gpt-oss's per-head sink): one more logit per head in every row's
            softmax denominator, with no value; the returned lse includes it; it gets a
            gradient.  Applied to (out, lse) elementwise (attention/sinks.py).
        dropout_seeds: keyword-only, (batch,) int32/int64 on q's device, or None: each
            sequence's dropout key in place of its batch index, so that a sequence gets
            the same mask alone and at any place in any batch (batch invariance under
            dropout).  Only with dropout_p > 0.

    Returns:
        out (batch, seqlen_q, nheads, headdim_v) in q's dtype; or
        ``(out, softmax_lse, None)`` when ``return_attn_probs``.  Both are
        differentiable (dq, dk, dv; deterministic, batch-invariant); ALiBi
        slopes get no gradient.

    Invariance: a query row's output bits depend only on its own query vector,
    the keys/values it can see, and (arch, dtype, head_dim, split_size), never
    on the batch, the other rows, the tensors' strides, or how the queries
    were cut into chunks (for the same keys and absolute positions).
    Rows that see no key (e.g. causal with seqlen_q > seqlen_k) are 0, with
    log-sum-exp +inf.
    """
    return dense_attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, return_attn_probs, learnable_sink=learnable_sink,
                           dropout_seeds=dropout_seeds)


def _page_gather_index(block_table: torch.Tensor, cu_seqlens_k: torch.Tensor, seqlens_k,
                       page_size: int) -> torch.Tensor:
    """Where each packed key lives in the pages: key ``j`` of sequence ``i`` (packed
    position ``cu_seqlens_k[i] + j``) is flat slot ``block_table[i, j // page_size] *
    page_size + j % page_size``.  int64 [total_k] on the device, built from the host
    lengths with no further synchronisation."""
    dev = block_table.device
    lens = torch.tensor(seqlens_k, dtype=torch.long, device=dev)
    total = int(sum(seqlens_k))
    seq = torch.repeat_interleave(torch.arange(len(seqlens_k), device=dev), lens, output_size=total)
    pos = torch.arange(total, device=dev) - cu_seqlens_k.long()[seq]
    return block_table.long()[seq, pos // page_size] * page_size + pos % page_size


def _page_layers(table, seqlens_k, page_size: int, flat: torch.Tensor):
    """The backward's write plan: ``[(dst, src), ...]`` index pairs, one per layer, where
    layer ``r`` holds every key whose page is being used for the ``r``-th time (in
    ascending (sequence, page position) order).  Inside a layer no slot repeats, so the
    scatter of layer ``r`` (added onto layers ``0 .. r-1``) has no race: a slot shared by
    several sequences sums their gradients in ascending sequence order, on every run."""
    uses, layer_of_use, offset = {}, [], []
    for i, n in enumerate(seqlens_k):
        offset.append(len(layer_of_use))
        for p in range(-(-n // page_size)):
            page = table[i][p]
            layer_of_use.append(uses.get(page, 0))
            uses[page] = layer_of_use[-1] + 1
    num_layers = max(uses.values(), default=0)
    if num_layers <= 1:
        src = torch.arange(flat.numel(), device=flat.device)
        return [(flat, src)]
    dev = flat.device
    lens = torch.tensor(seqlens_k, dtype=torch.long, device=dev)
    seq = torch.repeat_interleave(torch.arange(len(seqlens_k), device=dev), lens, output_size=flat.numel())
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(flat.numel(), device=dev) - starts[seq]
    use = torch.tensor(offset, dtype=torch.long, device=dev)[seq] + pos // page_size
    token_layer = torch.tensor(layer_of_use, dtype=torch.long, device=dev)[use]
    layers = []
    for r in range(num_layers):
        src = (token_layer == r).nonzero().flatten()
        layers.append((flat[src], src))
    return layers


class _PagedGather(torch.autograd.Function):
    """pages [num_blocks, page_size, H, D] -> packed keys [total_k, H, D] by ``flat``; the
    backward scatters the packed gradient back into zeros of the pages' shape, layer by
    layer (:func:`_page_layers`): deterministic, no atomics; unused slots get 0."""

    @staticmethod
    def forward(ctx, pages, flat, layers):
        ctx.pages_shape = pages.shape
        ctx.layers = layers
        return pages.reshape(-1, *pages.shape[2:]).index_select(0, flat)

    @staticmethod
    def backward(ctx, grad):
        num_blocks, page_size = ctx.pages_shape[:2]
        out = grad.new_zeros((num_blocks * page_size, *grad.shape[1:]))
        for r, (dst, src) in enumerate(ctx.layers):
            vals = grad.index_select(0, src)
            out[dst] = vals if r == 0 else out[dst] + vals
        return out.view(ctx.pages_shape), None, None


def _gather_pages(pages: torch.Tensor, flat: torch.Tensor, layers) -> torch.Tensor:
    """Paged keys (or values) gathered into the packed layout (one copy of the used keys);
    differentiable when ``layers`` (the backward's plan) is given."""
    if layers is None:
        return pages.reshape(-1, *pages.shape[2:]).index_select(0, flat)
    return _PagedGather.apply(pages, flat, layers)


def varlen_attention_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                          softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                          block_table=None, names=("q", "k", "v"),
                          cu_names=("cu_seqlens_q", "cu_seqlens_k"),
                          max_names=("max_seqlen_q", "max_seqlen_k"), learnable_sink=None,
                          dropout_seeds=None):
    """flash_attn_varlen_func's body; the names are the arguments as the user wrote them
    (the packed variants pass slices of ``qkv`` / ``kv`` and ``cu_seqlens`` /
    ``max_seqlen``).  Every check comes before any work."""
    paged = block_table is not None
    host_q, host_k = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  names=names, cu_names=cu_names, max_names=max_names,
                                  any_head_dim=True, paged=paged)
    num_seqs = cu_seqlens_q.numel() - 1
    q4 = q.unsqueeze(0)
    softmax_scale, left, right = check_options(q4, dropout_p, softmax_scale, window_size,
                                               softcap, None)
    if alibi_slopes is not None:
        check_options(q4.expand(num_seqs, *q.shape), 0.0, softmax_scale, window_size, softcap,
                      alibi_slopes)
    _check_bool("return_attn_probs", return_attn_probs)
    check_learnable_sink(learnable_sink, q, q.shape[1])
    seqlens_k = [b - a for a, b in zip(host_k[:-1], host_k[1:])]
    if paged:
        page_size, table = check_block_table(block_table, k, v, num_seqs, seqlens_k, names=names[1:])
    window = (left, right)
    left, right = normalize_window(causal, left, right, max(max_seqlen_k, 1))
    Hq = q.shape[1]
    dropout = _dropout(dropout_p, dropout_seeds, q, num_seqs, Hq)
    seqlens_q = [b - a for a, b in zip(host_q[:-1], host_q[1:])]
    need_keep = dropout is not None and (return_attn_probs or not get_deterministic_mode().enabled)
    keep = (keep_mask(dropout, num_seqs, Hq, max(seqlens_q, default=0), max(seqlens_k, default=0),
                      q.device, cu_seqlens_q, cu_seqlens_k) if need_keep else None)

    if paged:   # first implementation: one gather into the packed layout per call
        flat = _page_gather_index(block_table, cu_seqlens_k, seqlens_k, page_size)
        grads = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        layers = _page_layers(table, seqlens_k, page_size, flat) if grads else None
        k = _gather_pages(k, flat, layers if k.requires_grad else None)
        v = _gather_pages(v, flat, layers if v.requires_grad else None)

    probs = None
    if dropout is not None and return_attn_probs:
        probs = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
        cq, ck = host_q, host_k
        for i in range(num_seqs):
            slopes = alibi_slopes[i:i + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 \
                else alibi_slopes
            lq, lk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
            probs[i, :, :lq, :lk] = returned_probs(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]],
                                                   softmax_scale, causal, window, softcap, slopes,
                                                   keep[i:i + 1, :, :lq, :lk])[0]

    if not get_deterministic_mode().enabled:
        outs, lses = [], []
        cq, ck = host_q, host_k
        for i in range(num_seqs):
            slopes = alibi_slopes
            if slopes is not None and slopes.dim() == 2:
                slopes = slopes[i:i + 1]
            qi, ki, vi = q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]], v[None, ck[i]:ck[i + 1]]
            need_lse = return_attn_probs or learnable_sink is not None
            if dropout is not None:    # eager math with the kernels' mask
                lq, lk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
                o, _ = attention_reference(qi, ki, vi, softmax_scale, causal, window, softcap, slopes,
                                           dropout_mask=keep[i:i + 1, :, :lq, :lk], dropout_p=dropout.p)
                l_ = attention_reference(qi, ki, vi, softmax_scale, causal, window, softcap, slopes,
                                         compute_dtype=torch.float32)[1] if need_lse else None
            else:
                o, l_ = _stock_attention(qi, ki, vi, softmax_scale, causal, window, softcap, slopes,
                                         need_lse=need_lse)
            outs.append(o[0])
            lses.append(None if l_ is None else l_[0])
        out = torch.cat(outs, 0)
        lse = torch.cat(lses, 1) if return_attn_probs or learnable_sink is not None else None
        return _finish(out, lse, learnable_sink, return_attn_probs, probs)

    q, k, v, Dv = padded_for_kernels(q, k, v)
    out, lse = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                softmax_scale, left, right, float(softcap), alibi_slopes,
                                get_deterministic_mode().split_size, dropout)
    out = out[..., :Dv] if out.shape[-1] != Dv else out
    return _finish(out, lse, learnable_sink, return_attn_probs, probs)


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = True,
                           return_attn_probs: bool = False, block_table: Optional[torch.Tensor] = None,
                           *, learnable_sink: Optional[torch.Tensor] = None,
                           dropout_seeds: Optional[torch.Tensor] = None):
    """Attention over packed variable-length sequences, bitwise equal to running each alone.

    Args (flash-attn's names and meanings):
        q: (total_q, nheads, headdim); k: (total_k, nheads_k, headdim); v: (total_k,
            nheads_k, headdim_v), headdim_v <= headdim; any headdim from 1 to 256 (not a
            multiple of 8: zero-padded inside, as :func:`flash_attn_func`; so is v up to
            headdim).
        cu_seqlens_q, cu_seqlens_k: int32 (num_seqs + 1,) cumulative lengths from 0.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (ints).
        block_table: optional int32 (num_seqs, max_pages_per_seq): paged k/v.  Then
            k, v are (num_blocks, page_size, nheads_k, headdim), page_size a
            multiple of 16, and key ``j`` of sequence ``i`` is
            ``k[block_table[i, j // page_size], j % page_size]`` (its length still
            comes from cu_seqlens_k).  First implementation: the used pages are
            gathered into the packed layout once per call (a copy of
            2 x total_k x nheads_k x headdim elements, made on the device), then
            the contiguous kernel runs: the bits are those of the contiguous call.
            Differentiable: the gradients of the pages are the contiguous call's dk/dv
            at the slots the table uses (zero elsewhere); a slot that several
            sequences share sums their gradients in ascending sequence order.
        other arguments as :func:`flash_attn_func` (``learnable_sink`` and
        ``dropout_seeds`` too, the latter (num_seqs,)); ``alibi_slopes`` may be (nheads,)
        or (num_seqs, nheads).  Under dropout a sequence's key is its index in
        cu_seqlens (or ``dropout_seeds[i]``) and positions are inside the sequence.

    Returns out (total_q, nheads, headdim_v), or ``(out, softmax_lse, S_dmask)`` with
    lse (nheads, total_q) float32 when ``return_attn_probs`` (S_dmask: None without
    dropout, else (num_seqs, nheads, max_seqlen_q, max_seqlen_k), sequence ``i`` at
    ``[i, :, :len_q_i, :len_k_i]``, zeros elsewhere; as :func:`flash_attn_func`'s).

    Invariance: sequence ``i``'s rows are bitwise equal to
    ``flash_attn_func(q_i[None], k_i[None], v_i[None], ...)[0]`` (same keys,
    same absolute positions, causal aligned bottom-right per sequence),
    whatever else is packed with it; so are its own dq, dk, dv.  Paged and
    contiguous k/v give the same bits (layout invariance).
    """
    return varlen_attention_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                 return_attn_probs, block_table=block_table, learnable_sink=learnable_sink,
                                 dropout_seeds=dropout_seeds)
