"""Property-based fuzzing (hypothesis; a bounded number of examples, no deadline):

* mutated real ONNX graphs (the tiny decoder's export: dropped or renamed inputs, wrong dtypes and
  ranks, inconsistent shapes, cycles, dropped nodes, bad attributes) through ``tvm_lite.from_onnx``;
* random matrices (constant, zero, huge, tiny, NaN/inf, random) through the 4-bit quantizers
  (RTN, GPTQ, AWQ; E0M4 and int4; valid and invalid group sizes);
* random symbolic graphs through the memory planner (``relax_passes/plan_symbolic_arena.py``).

Each must finish without a crash or a hang and raise nothing but tvm_lite's documented errors
(``TvmLiteError``); what does come out is checked (finite dequantized weights within a step of the
input; no two storages that are live together share a workspace block, and every block provably
holds its members). Each test counts its examples and outcomes and prints them (``-s``).
"""

import copy
import os
import signal
from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from tvm_lite.errors import TvmLiteError

SHOW = bool(os.environ.get("TVM_LITE_FUZZ_SHOW"))  # print every error message (with -s)
HANG_S = 120  # one example taking longer than this is a hang
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


class _Hang(Exception):
    pass


class no_hang:
    """Fail an example that runs for more than ``HANG_S`` seconds (SIGALRM; main thread)."""

    def __enter__(self):
        def alarm(*_):
            raise _Hang(f"an example ran for more than {HANG_S} s")

        self.old = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(HANG_S)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)
        return False


def _outcome(counts: Counter, fn):
    """Run ``fn``; count "ok" or the tvm_lite error's type; anything else fails the test."""
    with no_hang():
        try:
            result = fn()
        except TvmLiteError as err:
            assert str(err).strip(), f"{type(err).__name__} without a message"
            counts[type(err).__name__] += 1
            if SHOW:
                print(f"  {type(err).__name__}: {str(err)[:200]}")
            return None
    counts["ok"] += 1
    return result


def _report(name: str, counts: Counter, minimum: int):
    total = sum(counts.values())
    print(f"\n[fuzz] {name}: {total} examples, 0 crashes: {dict(sorted(counts.items()))}")
    assert total >= minimum


# -- ONNX graphs --------------------------------------------------------------------------------------
DTYPES = [TensorProto.INT8, TensorProto.BOOL, TensorProto.DOUBLE, TensorProto.STRING,
          TensorProto.FLOAT16, TensorProto.INT32, TensorProto.UINT64]


def _mutate(model: onnx.ModelProto, data) -> str:
    """Apply one random mutation to ``model`` in place; returns what it did."""
    g = model.graph
    kind = data.draw(st.sampled_from([
        "drop_input", "rename_input", "input_dtype", "input_rank", "input_dim", "cycle",
        "drop_node", "bad_attribute", "drop_output", "initializer_dims", "swap_inputs"]))
    nodes = list(g.node)
    if kind == "drop_input":
        i = data.draw(st.integers(0, len(g.input) - 1))
        del g.input[i]
    elif kind == "rename_input":
        i = data.draw(st.integers(0, len(g.input) - 1))
        g.input[i].name = g.input[i].name + "_renamed"
    elif kind == "input_dtype":
        i = data.draw(st.integers(0, len(g.input) - 1))
        g.input[i].type.tensor_type.elem_type = data.draw(st.sampled_from(DTYPES))
    elif kind == "input_rank":
        i = data.draw(st.integers(0, len(g.input) - 1))
        dims = g.input[i].type.tensor_type.shape.dim
        if data.draw(st.booleans()) and len(dims):
            del dims[len(dims) - 1]
        else:
            dims.add().dim_value = data.draw(st.integers(1, 4))
    elif kind == "input_dim":  # a dynamic or static dim made inconsistent with the others
        i = data.draw(st.integers(0, len(g.input) - 1))
        dims = g.input[i].type.tensor_type.shape.dim
        if len(dims):
            j = data.draw(st.integers(0, len(dims) - 1))
            choice = data.draw(st.sampled_from(["value", "param", "zero"]))
            if choice == "value":
                dims[j].dim_value = data.draw(st.integers(2, 7))
            elif choice == "param":
                dims[j].dim_param = data.draw(st.sampled_from(["seq", "past_seq", "other", "2*x"]))
            else:
                dims[j].dim_value = 0
    elif kind == "cycle":  # an early node reads a later node's output
        a = data.draw(st.integers(0, len(nodes) - 2))
        b = data.draw(st.integers(a + 1, len(nodes) - 1))
        if len(nodes[a].input) and len(nodes[b].output):
            g.node[a].input[0] = nodes[b].output[0]
    elif kind == "drop_node":
        del g.node[data.draw(st.integers(0, len(nodes) - 1))]
    elif kind == "bad_attribute":
        with_attrs = [i for i, n in enumerate(nodes) if len(n.attribute)]
        if with_attrs:
            n = g.node[data.draw(st.sampled_from(with_attrs))]
            attr = n.attribute[data.draw(st.integers(0, len(n.attribute) - 1))]
            if attr.type == onnx.AttributeProto.INT:
                attr.i = data.draw(st.sampled_from([-9, 7, 2**40]))
            elif attr.type == onnx.AttributeProto.INTS:
                attr.ints[:] = data.draw(st.lists(st.integers(-9, 9), max_size=4))
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = data.draw(st.sampled_from([float("nan"), -1.0, 1e30]))
            else:
                attr.name = attr.name + "_x"
    elif kind == "drop_output":
        del g.output[data.draw(st.integers(0, len(g.output) - 1))]
    elif kind == "initializer_dims":
        t = g.initializer[data.draw(st.integers(0, len(g.initializer) - 1))]
        if len(t.dims):
            t.dims[0] = t.dims[0] + data.draw(st.sampled_from([-1, 1, 5]))
    elif kind == "swap_inputs":
        multi = [i for i, n in enumerate(nodes) if len(n.input) >= 2]
        n = g.node[data.draw(st.sampled_from(multi))]
        n.input[0], n.input[1] = n.input[1], n.input[0]
    return kind


@pytest.fixture(scope="module")
def tiny_onnx(tiny_decoder):
    return onnx.load(str(tiny_decoder[1] / "model.onnx"))


def test_fuzz_onnx_importer(tiny_onnx):
    import tvm_lite

    counts, kinds = Counter(), Counter()

    @FUZZ
    @given(data=st.data())
    def run(data):
        model = copy.deepcopy(tiny_onnx)
        for _ in range(data.draw(st.integers(1, 3))):
            kinds[_mutate(model, data)] += 1
        _outcome(counts, lambda: tvm_lite.from_onnx(model))

    run()
    print(f"\n[fuzz] ONNX mutations applied: {dict(sorted(kinds.items()))}")
    _report("mutated ONNX graphs -> tvm_lite.from_onnx", counts, 40)
    assert counts["OnnxImportError"] > 0  # the mutations do break graphs


# -- matrices through the quantizers ------------------------------------------------------------------
def _matrix(data) -> np.ndarray:
    k = data.draw(st.sampled_from([8, 16, 24, 40, 64, 96]))
    n = data.draw(st.integers(1, 12))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    kind = data.draw(st.sampled_from(["random", "constant", "zero", "huge", "tiny", "nan", "inf",
                                      "outlier", "fp16_edge"]))
    w = rng.standard_normal((k, n)).astype(np.float32)
    if kind == "constant":
        w[:] = data.draw(st.floats(-100, 100, allow_nan=False))
    elif kind == "zero":
        w[:] = 0
    elif kind == "huge":
        w *= data.draw(st.sampled_from([1e4, 1e6, 1e30]))
    elif kind == "tiny":
        w *= data.draw(st.sampled_from([1e-8, 1e-30, 1e-45]))
    elif kind == "nan":
        w.flat[rng.integers(w.size)] = np.nan
    elif kind == "inf":
        w.flat[rng.integers(w.size)] = -np.inf
    elif kind == "outlier":
        w.flat[rng.integers(w.size)] = 3e3
    elif kind == "fp16_edge":
        w = np.clip(w * 65504, -65504, 65504).astype(np.float32)
    return w


def test_fuzz_quantizers():
    from tvm_lite.quant import awq, gptq, rtn

    counts = Counter()

    @settings(FUZZ, max_examples=150)
    @given(data=st.data())
    def run(data):
        w = _matrix(data)
        fmt = data.draw(st.sampled_from(["e0m4", "int4"]))
        group = data.draw(st.sampled_from([8, 16, 32, 64, 128, 12, 0, -8]))
        method = data.draw(st.sampled_from(["rtn", "gptq", "awq"]))
        k = w.shape[0]
        x = np.random.default_rng(1).standard_normal((32, k)).astype(np.float32)
        h = x.T @ x
        if method == "rtn":
            call = lambda: rtn.rtn(w, fmt, group)  # noqa: E731
        elif method == "gptq":
            call = lambda: gptq.gptq(w, h, fmt, group)  # noqa: E731
        else:
            call = lambda: awq.awq(w, h, np.abs(x).mean(0), fmt, group)  # noqa: E731
        qw = _outcome(counts, call)
        if qw is None:
            return
        deq = qw.dequantize().astype(np.float64)
        assert deq.shape == w.shape and np.isfinite(deq).all()
        wf = w.astype(np.float64)
        # within one quantization step of the input's range (loose: GPTQ/AWQ trade per-weight
        # error for output error), plus fp16 rounding of the weight itself
        span = wf.max() - wf.min()
        assert np.abs(deq - wf).max() <= span * 2 / 15 * 2 + 1e-3 * np.abs(wf).max() + 1e-6

    run()
    _report("random matrices -> RTN/GPTQ/AWQ (E0M4, int4)", counts, 150)
    assert counts["ok"] > 0 and counts["QuantFormatError"] > 0


# -- symbolic graphs through the memory planner -------------------------------------------------------
def _random_graph(data):
    """A Relax function over x: (n, d0) and y: (m, d0) with symbolic n, m: a random chain of
    matmuls, elementwise ops, concats (n + m rows), transposes and reductions."""
    from tvm import relax, tirx

    n, m = tirx.Var("n", "int64"), tirx.Var("m", "int64")
    d0 = data.draw(st.sampled_from([4, 8, 16]))
    x = relax.Var("x", relax.TensorType((n, d0), "float32"))
    y = relax.Var("y", relax.TensorType((m, d0), "float32"))
    bb = relax.BlockBuilder()
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            live = [x, y]
            for _ in range(data.draw(st.integers(2, 10))):
                a = live[data.draw(st.integers(0, len(live) - 1))]
                rows, cols = a.ty.shape.values
                op = data.draw(st.sampled_from(["matmul", "unary", "add", "concat", "sum",
                                                "transpose", "broadcast"]))
                if op == "matmul" and isinstance(cols, tirx.IntImm):
                    d = data.draw(st.sampled_from([4, 8, 32]))
                    w = relax.const(rng.standard_normal((int(cols), d)).astype("float32"))
                    v = relax.op.matmul(a, w)
                elif op == "unary":
                    v = data.draw(st.sampled_from([relax.op.nn.relu, relax.op.nn.silu,
                                                   relax.op.exp]))(a)
                elif op in ("add", "concat"):
                    same = [b for b in live if tvm_ir_equal(b.ty.shape.values[1], cols)
                            and (op == "concat" or tvm_ir_equal(b.ty.shape.values[0], rows))]
                    b = same[data.draw(st.integers(0, len(same) - 1))]
                    v = relax.op.add(a, b) if op == "add" else relax.op.concat([a, b], axis=0)
                elif op == "sum":
                    v = relax.op.sum(a, axis=[0], keepdims=True)
                elif op == "transpose":
                    v = relax.op.permute_dims(a)
                else:  # a row broadcast over the rows
                    v = relax.op.add(a, relax.op.sum(a, axis=[0], keepdims=True))
                live.append(bb.emit(v))
            outs = live[-data.draw(st.integers(1, min(2, len(live) - 2))):]
            out = bb.emit_output(relax.Tuple(outs) if len(outs) > 1 else outs[0])
        bb.emit_func_output(out)
    return bb.get()


def tvm_ir_equal(a, b) -> bool:
    import tvm_ffi

    return bool(tvm_ffi.structural_equal(a, b))


def _lower_to_storages(mod):
    """TVM's passes up to its StaticPlanBlockMemory, as the tvm_lite pipeline runs them."""
    import tvm
    from tvm import relax

    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(), relax.transform.FuseTIR(),
        relax.transform.ToNonDataflow(), relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(), relax.transform.StaticPlanBlockMemory()])
    with tvm.target.Target({"kind": "llvm"}):
        return seq(mod)


def _check_plan(func):
    """The planner's properties: no two storages live at once share a block; every block
    provably holds each of its members."""
    from tvm_lite.relax_passes.plan_symbolic_arena import _analyzer, collect_requests, plan

    requests, _ = collect_requests(func)
    analyzer = _analyzer(func)
    blocks = plan(requests, analyzer)
    for block in blocks:
        for r in block.members:
            assert analyzer.can_prove(block.size >= r.size), (block.size, r.size)
        members = sorted(block.members, key=lambda r: r.start)
        for a, b in zip(members, members[1:]):
            assert a.end < b.start, f"storages {a.var.name_hint} and {b.var.name_hint} overlap"
    return len(requests), len(blocks)


def test_fuzz_memory_planner():
    from tvm_lite.relax_passes import PlanSymbolicArena

    counts, reuse = Counter(), Counter()

    @settings(FUZZ, max_examples=60)
    @given(data=st.data())
    def run(data):
        lowered = _lower_to_storages(_random_graph(data))
        storages, blocks = _check_plan(lowered["main"])
        reuse["storages"] += storages
        reuse["blocks"] += blocks
        planned = _outcome(counts, lambda: PlanSymbolicArena()(lowered))
        if planned is not None:
            assert "main_workspace_bytes" in [gv.name_hint for gv in planned.get_global_vars()]

    run()
    print(f"\n[fuzz] planner: {reuse['storages']} storages into {reuse['blocks']} blocks")
    _report("random symbolic graphs -> PlanSymbolicArena", counts, 60)
