"""The KV-cache value checks made on the device, for values the host never reads.

``flash_attn_with_kvcache`` checks lengths, batch indices, page ids and left pads on the
host when they are there for free (ints, CPU tensors).  Values on the GPU are not read
back (a sync per decode step): the append kernel and the combine kernel evaluate
:func:`cache_row_ok` for their batch row instead.  A row that fails writes nothing into
the cache and gets NaN outputs and lse.  The Triton partial kernel evaluates it too and
reads no key of a failing row; the Gluon one reads through the copy engine, which
zero-fills boxes outside the cache, so no kernel touches memory outside its tensors.  The
predicate is the host checks' own rule, row by row (attention/kvcache/validation.py).
"""

import triton
import triton.language as tl


@triton.jit
def cache_row_ok(SEQLENS, b, n_new, max_before, BATCH_IDX, num_rows, batch, LEFTPAD,
                 BLOCK_TABLE, stride_bt, page_size, max_pages,
                 HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr, PAGED: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """Whether batch row ``b``'s call is valid (a scalar bool):

    * ``0 <= SEQLENS[b] <= max_before`` (the host passes ``max_before`` = the capacity less
      the new tokens, and less the rotary span past the table's ``seqlen_ro``);
    * ``HAS_LEFTPAD``: ``0 <= LEFTPAD[b] <= SEQLENS[b]``;
    * ``HAS_BATCH_IDX``: ``0 <= BATCH_IDX[b] < num_rows``, and no other of the ``batch``
      rows names the same cache row while ``n_new > 0`` (``BLOCK_B >= batch``);
    * ``PAGED``: the pages the row uses after the append, ``BLOCK_TABLE[b, :cdiv(SEQLENS[b]
      + n_new, page_size)]``, lie in ``[0, num_rows)`` (the cache's pages; ``BLOCK_P >=
      max_pages``, the table's width).
    """
    before = tl.load(SEQLENS + b)
    ok = (before >= 0) & (before <= max_before)
    if HAS_LEFTPAD:
        lp = tl.load(LEFTPAD + b)
        ok = ok & (lp >= 0) & (lp <= before)
    if HAS_BATCH_IDX:
        row = tl.load(BATCH_IDX + b)
        ok = ok & (row >= 0) & (row < num_rows)
        offs_b = tl.arange(0, BLOCK_B)
        others = tl.load(BATCH_IDX + offs_b, mask=offs_b < batch, other=-1)
        dups = tl.sum(((others == row) & (offs_b != b)).to(tl.int32), 0)
        ok = ok & ((dups == 0) | (n_new == 0))
    if PAGED:
        offs_p = tl.arange(0, BLOCK_P)
        used = tl.cdiv(tl.maximum(before, 0) + n_new, page_size)
        in_use = (offs_p < used) & (offs_p < max_pages)
        pages = tl.load(BLOCK_TABLE + b.to(tl.int64) * stride_bt + offs_p, mask=in_use, other=0)
        bad = tl.sum(((pages < 0) | (pages >= num_rows)).to(tl.int32), 0)
        ok = ok & (bad == 0)
    return ok
