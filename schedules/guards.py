"""Guards around stock DLight rules: refuse a schedule the GPU code generators cannot compile.

DLight's GEMV rule stages the vector operand in shared memory. When that vector's length is a
symbolic dim (decode attention: scores · V over ``past_seq + 1`` keys), the staging buffer has a
symbolic size, which neither the CUDA nor the OpenCL code generator can allocate ("Can only handle
constant size stack allocation"). ``StaticBuffersOnly(rule)`` applies ``rule`` and returns nothing
when the result holds such a buffer, so ``ApplyDefaultSchedule`` falls through to the next rule.
"""

from __future__ import annotations

import re

from tvm import tirx
from tvm.s_tir import dlight as dl

_ON_CHIP_ALLOC = re.compile(r"alloc_buffer\(\((?P<shape>[^=]*)\),[^\n]*scope=\"(shared|local|warp)")
_SYMBOL = re.compile(r"(?<![\w.])(?!T\.)[A-Za-z_]\w*")


def has_symbolic_on_chip_buffer(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` allocates a shared/local buffer whose shape names a symbolic dim."""
    for match in _ON_CHIP_ALLOC.finditer(func.script()):
        shape = match.group("shape").replace("T.int64", "")
        if _SYMBOL.search(shape):
            return True
    return False


class StaticBuffersOnly(dl.ScheduleRule):
    """``rule``, unless its schedule allocates an on-chip buffer of symbolic size."""

    def __init__(self, rule: dl.ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        sch = self.rule.apply(func, target, tunable)
        if sch is None or isinstance(sch, list):
            return sch
        for _, f in sch.mod.functions_items():
            if isinstance(f, tirx.PrimFunc) and has_symbolic_on_chip_buffer(f):
                return None
        return sch
