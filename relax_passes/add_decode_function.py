"""AddDecodeFunction: add ``decode``, a copy of ``main`` with the new-token count bound to 1.

The imported model has one entry, ``main``, with the new-token count ``seq`` symbolic; every kernel
in it has a dynamic shape, which MetaSchedule cannot measure. In ``decode`` the projections become
static GEMVs ([1, K] x [K, N]): the kernels a decode step spends its time in, and the ones a tuning
database can hold. The engine calls ``decode`` for one-token steps and ``main`` for prompts.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.utils import copy_with_new_vars

from ..convention import DECODE, MAIN


@tvm.transform.module_pass(opt_level=0, name="AddDecodeFunction")
class AddDecodeFunction:
    """Add ``name`` = ``source`` with the symbolic dim ``var`` bound to ``value``."""

    def __init__(self, var: str = "seq", value: int = 1, source: str = MAIN, name: str = DECODE):
        self.var, self.value, self.source, self.name = var, value, source, name

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        names = {gv.name_hint for gv in mod.get_global_vars()}
        if self.name in names:
            return mod
        if self.source not in names:
            raise ValueError(f"AddDecodeFunction: the module has no function {self.source!r}")
        func = mod[self.source]
        dims = {v.name for v in relax.analysis.defined_symbolic_vars(func)}
        if self.var not in dims:
            raise ValueError(f"AddDecodeFunction: {self.source} has no symbolic dim {self.var!r} "
                             f"to bind (it has {sorted(dims)})")
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        # fresh Vars: two functions must not share binding sites
        out[tvm.ir.GlobalVar(self.name)] = copy_with_new_vars(func).with_attr("global_symbol",
                                                                               self.name)
        return relax.transform.BindSymbolicVars({self.var: self.value}, self.name)(out)
