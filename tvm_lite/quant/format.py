"""The E0M4 4-bit weight format (and the MLC-style int4 ablation), with a numpy reference.

A weight matrix ``W[K, N]`` (``y = x @ W``: ``K`` the reduction axis, as torch exports it) is cut
into groups of ``G`` consecutive rows along ``K``; every group of one column has its own fp16
scale. Codes are 4-bit integers ``q`` in ``[0, 15]``.

Packed layout (the same for E0M4 and int4)
------------------------------------------
``codes: uint16[ceil(K / 4), N]``. The word at ``codes[j, n]`` holds rows ``4j .. 4j+3`` of
column ``n``, the lowest row in the lowest nibble::

    bit   15 .. 12   11 .. 8    7 .. 4     3 .. 0
        +----------+----------+----------+----------+
        | q[4j+3]  | q[4j+2]  | q[4j+1]  | q[4j+0]  |     codes[j, n]  (uint16)
        +----------+----------+----------+----------+

Rows run along memory's slow axis and columns along its fast one, so a kernel that walks ``n``
(vector lanes on a CPU, work-items on a GPU) reads consecutive words, and a 32-bit load of two
neighbouring words is the two-lane ``0x000F000F`` form below. A ``K`` that is not a multiple of 4
(or of ``G``) is padded with zero weights, which quantize exactly and are never read.

E0M4: the code is an fp16 mantissa under a fixed exponent
---------------------------------------------------------
``0x6400`` is the fp16 ``2^10 = 1024``: sign 0, exponent ``11001``, mantissa 0. Its mantissa's
unit in the last place is exactly 1, so OR-ing a code into the low 4 mantissa bits gives the fp16
``1024 + q`` -- no int->float conversion::

    fp16 bits:  0 | 1 1 0 0 1 | 0 0 0 0 0 0 q q q q        = 1024 + q
                s   exponent    mantissa (10 bits)

    h = as_half(((word >> 4i) & 0x000F) | 0x6400)             i = k % 4

Two bitwise operations (AND, OR) make the fp16; the shift moves code ``i`` down and is a
constant once the 4 codes of a word are unrolled (none for ``i = 0``). On 32 bits the same two
operations make two fp16 lanes at once: ``((w32 >> 4i) & 0x000F000F) | 0x64006400``.

Scale and zero are pre-folded: the format stores ``s`` (fp16) and ``c = 1024 + z`` (fp16, ``z``
an integer zero point, so ``c`` is exact) per group, and

    w = (h - c) * s = (q - z) * s

``h - c`` is exact in fp16 (two integers in [1024, 2048), ulp 1), so the only rounding is the
multiply, the same as ``(q - z) * s``. A GPU kernel can go one step further and take ``s`` out of
the group's partial sum: ``sum_k x_k w_k = s * sum_k x_k (h_k - c)``, leaving one subtract and the
multiply-add the matmul does anyway.

Cost per dequantized weight in the generated kernel -- read off the OpenCL that
``opencl -device=adreno`` produces (``tests/test_quant.py`` checks the text): the 4 codes of a word
are unrolled, so each shift is by a constant, and every operation works on a ``ushort2``/``half2``
of two columns::

    E0M4: AND + OR                      -> fp16 by reinterpretation (as_half / *(half2*)&v)
          + 1 shift (by 4, 8, 12) for 3 codes of 4      = 2.75 integer ops, 0 conversions
          then 1 fp16 subtract (c), 1 fp16 multiply (s)
    int4: AND + 1 shift for 3 codes of 4               = 1.75 integer ops
          + 1 int->fp16 conversion (convert_half)
          then 1 fp16 subtract (8), 1 fp16 multiply (s)

E0M4 trades the int->float conversion for an OR. (With the fp32 activations of today's exports
the kernel then widens the fp16 weight to fp32 for the multiply-add, in both formats: a float->
float conversion the fp16-activation build will not need.) The CPU rule (LLVM) unrolls the same
way, 16 columns per vector instead of 2.

int4 ablation (MLC-LLM ``q4f16_1``)
-----------------------------------
Same packed codes and fp16 scales, symmetric, no zero stored: ``w = (float(q) - 8) * s`` after
the shift and mask. An asymmetric zero would cost int4 nothing at run time either, but MLC's
format has none; E0M4 gets one for free because its subtract is needed anyway.

Storage per weight: 4 bits + 16 bits of scale (+ 16 bits of ``c`` for E0M4) per ``G`` weights:
E0M4 ``0.5 + 4/G`` bytes (0.625 at G=32, 0.531 at G=128), int4 ``0.5 + 2/G``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ..errors import UserError

FORMATS = ("e0m4", "int4")
CODES_PER_WORD = 4  # 4-bit codes per uint16 word
E0M4_EXP_BITS = 0x6400  # fp16 1024.0: mantissa ulp = 1
E0M4_BASE = 1024.0
INT4_ZERO = 8
MAX_CODE = 15
GROUP_SIZES = (16, 32, 64, 128, 256)  # any multiple of 8 works; these are the documented ones
DEFAULT_GROUP_SIZE = 32


class QuantFormatError(UserError):
    """A weight or option the 4-bit formats cannot represent; the message names it."""


FP16_MAX = 65504.0  # 4-bit weights are dequantized to fp16 (and their scales are fp16)


def check_weight(w, dtype=np.float32) -> np.ndarray:
    """``w`` as a 2-D [K, N] float array the 4-bit formats can hold: finite values (no NaN/inf)
    within fp16's range; else a :class:`QuantFormatError` naming the problem."""
    a = np.asarray(w)
    if a.ndim != 2 or 0 in a.shape:
        raise QuantFormatError(f"a weight to quantize must be a non-empty 2-D [K, N] matrix, got "
                               f"shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise QuantFormatError(f"a weight to quantize must be numeric, got {a.dtype}")
    a = np.array(a, dtype) if a.dtype != dtype else a
    finite = np.isfinite(a)
    if not finite.all():
        raise QuantFormatError(f"the {a.shape[0]}x{a.shape[1]} weight has "
                               f"{int((~finite).sum())} NaN/inf value(s): fix the checkpoint first")
    peak = float(np.abs(a).max())
    if peak > FP16_MAX:
        raise QuantFormatError(f"the {a.shape[0]}x{a.shape[1]} weight has values up to {peak:.3g}, "
                               f"beyond fp16's range ({FP16_MAX:g}) that 4-bit weights dequantize to")
    return a


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, (int, np.integer)) or group_size < 8 or group_size % 8:
        raise QuantFormatError(f"group size must be a positive multiple of 8 (e.g. {GROUP_SIZES}), "
                               f"got {group_size!r}")
    return int(group_size)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise QuantFormatError(f"unknown 4-bit format {fmt!r}; choose one of {FORMATS}")
    return fmt


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def pack(codes: np.ndarray) -> np.ndarray:
    """``codes: [K, N]`` integers in [0, 15] -> ``uint16[ceil(K/4), N]`` (layout above)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise QuantFormatError(f"pack expects a 2-D [K, N] array of codes, got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > MAX_CODE):
        raise QuantFormatError(f"codes must lie in [0, {MAX_CODE}], got [{codes.min()}, {codes.max()}]")
    k, n = codes.shape
    words = -(-k // CODES_PER_WORD)
    padded = np.zeros((words * CODES_PER_WORD, n), np.uint16)
    padded[:k] = codes
    padded = padded.reshape(words, CODES_PER_WORD, n)
    out = np.zeros((words, n), np.uint16)
    for i in range(CODES_PER_WORD):
        out |= padded[:, i] << np.uint16(4 * i)
    return out


def unpack(packed: np.ndarray, k: int) -> np.ndarray:
    """``uint16[ceil(K/4), N]`` -> ``uint8[K, N]`` codes."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint16 or packed.ndim != 2:
        raise QuantFormatError(f"packed codes must be a 2-D uint16 array, got {packed.dtype} {packed.shape}")
    if k < 0 or packed.shape[0] != -(-k // CODES_PER_WORD):
        raise QuantFormatError(f"K={k} codes take {-(-k // CODES_PER_WORD)} packed rows, "
                               f"got {packed.shape[0]}")
    nibbles = [(packed >> np.uint16(4 * i)) & np.uint16(0xF) for i in range(CODES_PER_WORD)]
    codes = np.stack(nibbles, axis=1).reshape(-1, packed.shape[1])
    return codes[:k].astype(np.uint8)


def e0m4_half(codes: np.ndarray) -> np.ndarray:
    """The fp16 ``1024 + q`` made by OR-ing the code under the fixed exponent (no conversion)."""
    return (np.asarray(codes).astype(np.uint16) | np.uint16(E0M4_EXP_BITS)).view(np.float16)


@dataclass
class QuantizedWeight:
    """One 4-bit weight matrix ``[K, N]`` in E0M4 or int4 (the packed tensors the kernels read).

    ``act_scale`` (AWQ only): the kernel's input is multiplied by it per channel ``k`` first;
    the stored matrix is ``diag(1/act_scale) @ W`` quantized.
    """

    fmt: str
    group_size: int
    k: int
    n: int
    codes: np.ndarray  # uint16 [ceil(K/4), N]
    scale: np.ndarray  # fp16 [ceil(K/G), N]
    zero: np.ndarray | None = None  # fp16 c = 1024 + z [ceil(K/G), N]; E0M4 only
    act_scale: np.ndarray | None = None  # float32 [K]; AWQ only
    info: dict = field(default_factory=dict)  # method, error figures

    def __post_init__(self):
        check_format(self.fmt)
        ng, words = num_groups(self.k, self.group_size), -(-self.k // CODES_PER_WORD)
        problems = []
        if self.codes.dtype != np.uint16 or self.codes.shape != (words, self.n):
            problems.append(f"codes {self.codes.dtype}{list(self.codes.shape)} != uint16[{words}, {self.n}]")
        if self.scale.dtype != np.float16 or self.scale.shape != (ng, self.n):
            problems.append(f"scale {self.scale.dtype}{list(self.scale.shape)} != float16[{ng}, {self.n}]")
        if self.fmt == "e0m4" and (self.zero is None or self.zero.dtype != np.float16
                                   or self.zero.shape != (ng, self.n)):
            problems.append(f"E0M4 needs zero (c = 1024 + z) float16[{ng}, {self.n}]")
        if self.fmt == "int4" and self.zero is not None:
            problems.append("int4 (MLC-style, symmetric) stores no zero")
        if problems:
            raise QuantFormatError("inconsistent QuantizedWeight: " + "; ".join(problems))

    def dequantize(self) -> np.ndarray:
        """The fp16 weights the kernels compute (before ``act_scale``), ``[K, N]``."""
        return dequantize(self.fmt, self.codes, self.scale, self.zero, self.k, self.group_size)

    def effective_weight(self) -> np.ndarray:
        """What the quantized matmul multiplies the original input by (float32 ``[K, N]``)."""
        w = self.dequantize().astype(np.float32)
        if self.act_scale is not None:
            w = w * self.act_scale.astype(np.float32)[:, None]
        return w

    def arrays(self) -> dict:
        """The tensors the kernel takes, by role, in the kernel's argument order."""
        out = {"codes": self.codes, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        return out

    @property
    def nbytes(self) -> int:
        """Bytes stored for this matrix (codes + scales + zeros + AWQ's input scale)."""
        extra = self.act_scale.nbytes if self.act_scale is not None else 0
        return sum(a.nbytes for a in self.arrays().values()) + extra


def dequantize(fmt: str, codes: np.ndarray, scale: np.ndarray, zero, k: int, group_size: int) -> np.ndarray:
    """Reference dequantization, in fp16 arithmetic exactly as the kernels do it: ``[K, N]``."""
    check_format(fmt)
    q = unpack(codes, k)
    rows = np.arange(k) // group_size
    s = scale[rows]
    if fmt == "e0m4":
        return (e0m4_half(q) - zero[rows]) * s
    return (q.astype(np.float16) - np.float16(INT4_ZERO)) * s


def bytes_per_weight(fmt: str, group_size: int) -> float:
    return 0.5 + (4 if fmt == "e0m4" else 2) / group_size


__all__ = ["FORMATS", "QuantizedWeight", "QuantFormatError", "pack", "unpack", "dequantize",
           "e0m4_half", "bytes_per_weight", "check_group_size", "check_format", "num_groups",
           "E0M4_EXP_BITS", "E0M4_BASE", "INT4_ZERO", "DEFAULT_GROUP_SIZE", "GROUP_SIZES"]
