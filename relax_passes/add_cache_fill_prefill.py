"""AddCacheFillPrefill: ``prefill_fill``, a prefill that only writes the K/V cache.

A prompt run in chunks needs the logits of its last chunk only: the chunks before it are run for
the K/V rows they write. ``prefill_last`` (``relax_passes/add_last_row_prefill.py``) still computes
one row's logits, and everything that feeds them alone: the last layer's attention, its
o-projection and MLP (on one row), the final norm and the vocabulary projection. On an H100 that
was ~120 us of each 256-token chunk of Llama-1B (twenty-third session's profile: the lm_head's
GEMV 60 us, the last layer's attention 23 us, the tail's three GEMVs 34 us, the argmax 4 us).

This pass adds ``prefill_fill``: ``prefill``'s parameters and attributes (so the tuple entries,
memory plan and step entries treat it like ``prefill``), its result the tuple of its in-place
cache writes (every ``call_tir_inplace`` binding: ``InplaceKVCache``'s writes and a window
layer's ring attention, which writes its ring). Dead-code elimination (the end of the graph
phase) then drops whatever only the logits needed. ``AddStepEntries`` builds
``prefill_chain_flat`` over it: a chunk before a prompt's last, which returns nothing the host
reads (``Engine.prefill_greedy``).

A no-op where the module has no in-place ``prefill`` or its ``prefill`` writes no cache in place.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..convention import PREFILL_FILL
from .add_last_row_prefill import add_prefill_variant, prefill_variant

INPLACE = "relax.call_tir_inplace"


def cache_writes(func: relax.Function) -> list:
    """The vars bound to ``func``'s in-place calls (its cache writes), in binding order."""
    return [b.var for block in func.body.blocks for b in block.bindings
            if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Call)
            and isinstance(b.value.op, tvm.ir.Op) and b.value.op.name == INPLACE]


def fill_function(func: relax.Function) -> relax.Function | None:
    """``func`` (an in-place ``prefill``) returning its cache writes, or None where it has none."""
    writes = cache_writes(func)
    last = func.body.blocks[-1]
    own = {b.var for b in last.bindings}
    # a DataflowVar is seen only in its own block: the writes must be the last block's, or
    # outputs of theirs
    if not writes or any(isinstance(w, relax.DataflowVar) and w not in own for w in writes):
        return None
    value = relax.BlockBuilder().normalize(relax.Tuple(writes))
    out = relax.Var("cache_writes", value.ty)  # bound at the last block's end, an output var
    return prefill_variant(func, [relax.VarBinding(out, value)], out, PREFILL_FILL)


@tvm.transform.module_pass(opt_level=0, name="AddCacheFillPrefill")
class AddCacheFillPrefill:
    """Add ``prefill_fill`` next to an in-place ``prefill`` that has the attribute ``kv_attr``
    (see the module doc)."""

    def __init__(self, kv_attr: str):
        self.kv_attr = kv_attr

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return add_prefill_variant(mod, self.kv_attr, PREFILL_FILL, fill_function)
