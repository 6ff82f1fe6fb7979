"""``tvm-lite memory``: planned activation memory per function, and what a step allocates.

Three plans of the same module, evaluated at several sequence lengths:

* **none**: every tensor its own allocation (the sum of all intermediate tensors' bytes);
* **TVM bound**: TVM's ``StaticPlanBlockMemory`` on one ``main`` with ``tir_var_upper_bound``
  (every storage sized at the bound: what stock TVM gives a dynamic model, decode included);
* **TVM**: ``StaticPlanBlockMemory`` without a bound (reuse between identical symbolic sizes only);
* **tvm_lite**: ``PlanSymbolicArena`` on the separate ``prefill`` and ``decode`` functions.

Allocations and host shape work per step are counted while the engine runs, through the VM's
instrument hook (every builtin and kernel call the VM makes passes through it).
"""

from __future__ import annotations

import time
from collections import Counter

import tvm
from tvm import relax, tirx

from .convention import DECODE, DECODERS, PREFILL

SHAPE_BUILTINS = ("vm.builtin.check_tensor_info", "vm.builtin.check_shape_info",
                  "vm.builtin.match_shape", "vm.builtin.make_shape", "vm.builtin.alloc_shape_heap",
                  "vm.builtin.check_prim_value_info", "vm.builtin.match_prim_value",
                  "vm.builtin.make_prim_value", "shape_func")
ALLOC_BUILTINS = ("vm.builtin.alloc_storage", "vm.builtin.alloc_tensor")


def evaluate(expr, values: dict) -> int:
    """A symbolic size at concrete dims (``{"seq": 128, "past_seq": 0}``)."""
    if isinstance(expr, int):
        return expr
    analyzer = tvm.sym.Analyzer()
    for var in tirx.analysis.undefined_vars(expr):
        if var.name not in values:
            raise KeyError(f"no value for dim {var.name} in {expr}")
        analyzer.bind(var, tirx.IntImm("int64", values[var.name]))
    out = analyzer.simplify(expr)
    if not isinstance(out, tirx.IntImm):
        raise ValueError(f"{expr} did not evaluate to a constant: {out}")
    return int(out)


def _storage_bytes(func: relax.Function):
    """Sum of the storages TVM's planner allocates, plus the tensors it leaves unplanned."""
    total = tirx.IntImm("int64", 0)
    for block in func.body.blocks:
        for b in block.bindings:
            value = b.value
            if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)):
                continue
            if value.op.name == "relax.memory.alloc_storage":
                total = total + value.args[0].values[0]
            elif value.op.name == "relax.builtin.alloc_tensor":
                size = tirx.IntImm("int64", tvm.runtime.DataType(str(b.var.ty.dtype)).bits // 8)
                for dim in b.var.ty.shape.values:
                    size = size * dim
                total = total + size
    return total


def plans(mod: tvm.IRModule, target="llvm", bound: int = 2048) -> dict:
    """Symbolic activation bytes of each plan, per function, for an imported decoder ``mod``."""
    from .compiler import detach_params
    from .pipeline import phases
    from .target import parse_target

    tgt = parse_target(target)
    mod, _ = detach_params(mod)
    with tgt:
        steps = phases(tgt)
        lowered = tvm.transform.Sequential([p for _, ps in steps[:3] for p in ps])(mod)
        vm_passes = steps[3][1]
        upto = [type(p).__name__ if not hasattr(p, "info") else p.info.name for p in vm_passes]
        cut = upto.index("StaticPlanBlockMemory") + 1
        ours = tvm.transform.Sequential(vm_passes[:cut + 1])(lowered)  # + PlanSymbolicArena
        out = {}
        for name in DECODERS:
            attrs = ours[name].attrs
            out[name] = {"none": attrs["tvm_lite.unplanned_bytes"],
                         "TVM": attrs["tvm_lite.tvm_planned_bytes"],
                         "tvm_lite": attrs["tvm_lite.workspace_bytes"],
                         "blocks": int(attrs["tvm_lite.arena_blocks"])}
        # stock TVM: one function for every length, bounded
        dims = {v.name: v for v in relax.analysis.defined_symbolic_vars(lowered[PREFILL])}
        bounded = lowered[PREFILL].with_attr(
            "tir_var_upper_bound", {name: bound for name in dims if name != "cache_len"})
        stock = tvm.IRModule({gv: f for gv, f in lowered.functions_items()
                              if gv.name_hint not in (DECODE, PREFILL)})
        stock[PREFILL] = bounded
        stock = tvm.transform.Sequential(vm_passes[:cut])(stock)
        out[PREFILL]["TVM bound"] = _storage_bytes(stock[PREFILL])
        out[DECODE]["TVM bound"] = out[PREFILL]["TVM bound"]  # the same function runs decode
    return out


def plan_table(mod, seqs=(1, 128, 512, 2048), past: int = 0, bound: int = 2048) -> list[dict]:
    """Rows of activation MB per plan: seq = 1 is a decode step, longer ones a prefill call."""
    symbolic = plans(mod, bound=bound)
    rows = []
    for seq in seqs:
        name = DECODE if seq == 1 else PREFILL
        values = {"seq": seq, "past_seq": past}
        row = {"function": name, "seq": seq, "past": past}
        for plan in ("none", "TVM", "TVM bound", "tvm_lite"):
            column = f"TVM bound={bound}" if plan == "TVM bound" else plan
            row[column] = evaluate(symbolic[name][plan], values) / 1e6
        rows.append(row)
    return rows


class StepCounter:
    """Counts the VM's calls by name during one engine step (allocations, shape work, kernels)
    and the host time spent in shape builtins. Installed with ``VirtualMachine.set_instrument``."""

    def __init__(self, vm):
        self.calls = Counter()
        self.shape_seconds = 0.0
        self._t0 = {}
        vm.set_instrument(lambda *a: self(*a))

    def reset(self):
        self.calls.clear()
        self.shape_seconds = 0.0

    def __call__(self, func, name, before_run, ret_value, *args):
        if before_run:
            self.calls[name] += 1
            if name.startswith(SHAPE_BUILTINS):
                self._t0[name] = time.perf_counter()
        elif name in self._t0:
            self.shape_seconds += time.perf_counter() - self._t0.pop(name)
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    @property
    def allocations(self) -> int:
        return sum(self.calls[n] for n in ALLOC_BUILTINS)
