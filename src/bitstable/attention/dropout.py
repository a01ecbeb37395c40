"""Host side of attention dropout: the seed, the stream key, the mask, its reference.

What a call's keep-mask depends on (kernels/dropout.py has the bit-level definition):

* the stream key, from torch's generator as flash-attn takes it: on CUDA the default
  generator's ``initial_seed()`` and philox ``get_offset()``, after which the offset
  advances by ``batch * nheads * 32`` (flash-attn's increment, so the generator is left
  where flash-attn leaves it); on the CPU (whose generator has no offset) a 63-bit seed
  drawn from the CPU generator, offset 0.  ``stream = (seed + offset * 0x9E3779B97F4A7C15)
  mod 2**64``.  ``torch.manual_seed(s)`` before a call therefore replays its mask;
* the sequence's key: its batch index (flash-attn's keying), or ``dropout_seeds[b]``
  when given, so that a sequence keeps its mask alone and inside any batch, at any
  position (batch invariance under dropout);
* the query head and the (query, key) positions inside the sequence.

The forward and the backward of one call use one mask (the backward gets the forward's
stream key).  Not under CUDA-graph capture: a captured call would replay one mask.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._backend import cdiv, interpreting
from ..kernels.dropout import dropout_mask_kernel

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
#: Bit set on 32-bit kernel arguments so that Triton always types them int64 (one compiled
#: variant whatever the value; the kernels read the low 32 bits).
_WIDE = 1 << 40


class Dropout(NamedTuple):
    """One call's dropout: ``p`` in (0, 1), the 64-bit ``stream`` key, ``seeds`` (the
    per-sequence keys, int64 [batch] on q's device) or None for the batch index."""

    p: float
    stream: int
    seeds: Optional[torch.Tensor]

    @property
    def threshold(self) -> int:
        """The 8-bit drop threshold: an entry is dropped iff its 8-bit draw is below it
        (``p`` in steps of 1/256, as flash-attn draws it; a p below 1/256 drops nothing)."""
        return min(int(self.p * 256.0), 255)

    @property
    def scale(self) -> float:
        """1 / (1 - p): the factor on kept entries."""
        return 1.0 / (1.0 - self.p)

    def kernel_args(self):
        """(stream_lo, stream_hi, threshold) as the kernels take them (see ``_WIDE``)."""
        return (self.stream & 0xFFFFFFFF) | _WIDE, (self.stream >> 32) | _WIDE, self.threshold | _WIDE


def stream_key(seed: int, offset: int) -> int:
    """The 64-bit stream key of a generator ``seed`` and philox ``offset``."""
    return (int(seed) + int(offset) * _GOLDEN) & _MASK64


@torch.compiler.disable
def draw_stream(device: torch.device, batch: int, nheads: int) -> int:
    """Take this call's stream key from torch's generator for ``device`` and advance it
    (see the module docstring).  Runs eagerly under ``torch.compile`` (a graph break), so
    every compiled step draws a fresh key as an eager one does."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("dropout_p > 0 inside CUDA-graph capture: the mask's seed would be "
                               "frozen at capture and every replay would drop the same entries")
        gen = torch.cuda.default_generators[device.index if device.index is not None
                                            else torch.cuda.current_device()]
        seed, offset = gen.initial_seed(), gen.get_offset()
        gen.set_offset(offset + batch * nheads * 32)
        return stream_key(seed, offset)
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())
    return stream_key(seed, 0)


def check_dropout_seeds(dropout_seeds, dropout_p: float, batch: int, device: torch.device,
                        name: str = "dropout_seeds") -> Optional[torch.Tensor]:
    """``dropout_seeds`` checked: None, or an integer tensor of shape (batch,) on q's device
    (returned as int64).  Refused when dropout_p is 0 (it would be silently unused)."""
    if dropout_seeds is None:
        return None
    if not isinstance(dropout_seeds, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(dropout_seeds).__name__}")
    if dropout_p == 0.0:
        raise ValueError(f"{name} is given but dropout_p is 0.0: there is no mask to key")
    if dropout_seeds.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {dropout_seeds.dtype}")
    if tuple(dropout_seeds.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one key per sequence), "
                         f"got {tuple(dropout_seeds.shape)}")
    if dropout_seeds.device != device:
        raise ValueError(f"{name} is on {dropout_seeds.device}, expected q's device {device}")
    return dropout_seeds.to(torch.int64).contiguous()


def keep_mask(dropout: Dropout, batch: int, nheads: int, seqlen_q: int, seqlen_k: int,
              device: torch.device, cu_seqlens_q: Optional[torch.Tensor] = None,
              cu_seqlens_k: Optional[torch.Tensor] = None, tile=None) -> torch.Tensor:
    """The call's keep-mask, bool [batch, nheads, seqlen_q, seqlen_k], from the kernels' own
    mask function (varlen: sequence ``b``'s entries at ``[b, :, :Lq_b, :Lk_b]``, False past
    them; ``seqlen_q/k`` are then the max lengths).  ``tile``: (rows, keys) per program, for
    tests (launch-only: the mask is the same for every tile; default 64 x 64, 16 x 16 under
    the interpreter)."""
    out = torch.zeros((batch, nheads, seqlen_q, seqlen_k), dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out.bool()
    varlen = cu_seqlens_q is not None
    bm, bn = tile or ((16, 16) if interpreting() else (64, 64))
    lo, hi, thr = dropout.kernel_args()
    seeds = dropout.seeds if dropout.seeds is not None else out
    grid = (cdiv(seqlen_q, bm), cdiv(seqlen_k, bn), batch * nheads)
    dropout_mask_kernel[grid](out, seeds, cu_seqlens_q if varlen else out, cu_seqlens_k if varlen else out,
                              lo, hi, thr, nheads, seqlen_q, seqlen_k,
                              out.stride(0), out.stride(1), out.stride(2),
                              HAS_SEQ_KEYS=dropout.seeds is not None, VARLEN=varlen,
                              BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()


# ---------------------------------------------------------------------------------------
# The same function in torch integer arithmetic: the specification the tests hold the
# kernels to (int64 tensors holding uint32 values; products split so nothing overflows).
# ---------------------------------------------------------------------------------------

_U32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit halves of ``a * m`` for uint32 values ``a`` (int64) and constant ``m``."""
    t = a * (m & 0xFFFF)              # < 2**48
    u = a * (m >> 16)                 # < 2**48
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & _U32
    return hi, lo


#: Philox rounds of the mask, written here independently of kernels/dropout.py's
#: DROPOUT_ROUNDS on purpose: this is the specification, so a change of either one alone
#: fails the kernel = spec test.
MASK_ROUNDS = 7


def philox4x32_reference(c0, c1, c2, c3, k0, k1, rounds: int = MASK_ROUNDS):
    """Random123's philox4x32-``rounds`` on int64 tensors (or ints) holding uint32 values."""
    c = [torch.as_tensor(x, dtype=torch.int64) for x in (c0, c1, c2, c3)]
    k0 = torch.as_tensor(k0, dtype=torch.int64)
    k1 = torch.as_tensor(k1, dtype=torch.int64)
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + 0x9E3779B9) & _U32
            k1 = (k1 + 0xBB67AE85) & _U32
        hi0, lo0 = _mulhilo(c[0], 0xD2511F53)
        hi1, lo1 = _mulhilo(c[2], 0xCD9E8D57)
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return c


def keep_mask_reference(dropout: Dropout, seq_keys, nheads: int, seqlen_q: int,
                        seqlen_k: int) -> torch.Tensor:
    """bool [len(seq_keys), nheads, seqlen_q, seqlen_k] keep-mask in plain torch (CPU), for
    sequences whose keys are ``seq_keys`` (ints: batch indices or dropout_seeds)."""
    rows = []
    for key in seq_keys:
        key = int(key) & ((1 << 64) - 1)
        q = torch.arange(seqlen_q, dtype=torch.int64).view(1, -1, 1)
        kk = torch.arange(seqlen_k, dtype=torch.int64).view(1, 1, -1)
        h = torch.arange(nheads, dtype=torch.int64).view(-1, 1, 1)
        shape = (nheads, seqlen_q, seqlen_k)
        r = philox4x32_reference((4 * (kk // 32) + (kk % 8) // 2).expand(shape),
                                 (16 * (q // 16) + q % 8).expand(shape), h.expand(shape),
                                 torch.full(shape, key & _U32, dtype=torch.int64),
                                 dropout.stream & _U32, (dropout.stream >> 32) ^ (key >> 32))
        which = ((kk // 8) % 4).expand(shape)
        word = torch.stack(r, 0).gather(0, which.unsqueeze(0)).squeeze(0)
        byte = kk % 2 + 2 * ((q // 8) % 2)
        draw = (word >> (8 * byte)) & 0xFF               # byte key % 2 + 2 (query // 8 % 2)
        rows.append(draw >= dropout.threshold)
    return torch.stack(rows, 0)


def to_op_args(dropout: Optional[Dropout]):
    """(dropout_p, stream as a signed int64, seeds) for the custom ops' schemas."""
    if dropout is None:
        return 0.0, 0, None
    stream = dropout.stream - (1 << 64) if dropout.stream >= (1 << 63) else dropout.stream
    return dropout.p, stream, dropout.seeds


def from_op_args(dropout_p: float, stream: int, seeds: Optional[torch.Tensor]) -> Optional[Dropout]:
    """The inverse of :func:`to_op_args` (None when dropout_p is 0)."""
    if dropout_p == 0.0:
        return None
    return Dropout(float(dropout_p), int(stream) & _MASK64, seeds)


def returned_probs(q: torch.Tensor, k: torch.Tensor, softmax_scale: float, causal: bool, window_size,
                   softcap: float, alibi_slopes: Optional[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """flash-attn's ``S_dmask`` (what ``return_attn_probs=True`` returns under dropout):
    [B, Hq, Lq, Lk] in q's dtype, ``exp(logit - row max)`` (unnormalised: divide by
    ``exp(lse - row max)`` for the probabilities; the row max over all keys, in float32)
    with every dropped entry negated.  Entries a row cannot see are 0.  A debugging
    output, as in flash-attn: O(Lq * Lk) memory, computed by eager torch."""
    from ..reference import attention_scores
    s, _ = attention_scores(q, k, softmax_scale, causal, window_size, softcap, alibi_slopes, torch.float32)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    return torch.where(keep, p, -p).to(q.dtype)
