"""Symbolic-size memory planning (relax_passes/plan_symbolic_arena.py) and sequence padding."""

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings, strategies as st
from tvm import relax

from conftest import PROMPTS
from tvm_lite.engine import Engine, GenerationConfig
from tvm_lite.memory import StepCounter, evaluate
from tvm_lite.relax_passes import PlanSymbolicArena
from tvm_lite.relax_passes.plan_symbolic_arena import _analyzer, collect_requests, plan

LLVM = tvm.target.Target({"kind": "llvm"})
UP_TO_PLAN = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              relax.transform.FuseOps(), relax.transform.FuseTIR(),
              relax.transform.ToNonDataflow(), relax.transform.RemovePurityChecking(),
              relax.transform.CallTIRRewrite(), relax.transform.StaticPlanBlockMemory()]
AFTER_PLAN = [relax.transform.LowerAllocTensor(), relax.transform.KillAfterLastUse(),
              relax.transform.LowerRuntimeBuiltin(), relax.transform.ComputePrimValue(),
              relax.transform.VMShapeLower(), relax.transform.AttachGlobalSymbol()]


# -- random graphs with a symbolic dim -------------------------------------------------------------
@st.composite
def graphs(draw):
    """A random chain/DAG of ops over (k*n, width) tensors, with its numpy reference."""
    ops = draw(st.lists(st.sampled_from(["add", "mul", "exp", "matmul", "concat", "silu"]),
                        min_size=2, max_size=12))
    widths = draw(st.lists(st.sampled_from([4, 8, 24]), min_size=len(ops), max_size=len(ops)))
    return ops, widths


def _build(ops, widths):
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([n, 8], "float32"))
    weights = []
    with bb.function("main", [x]):
        with bb.dataflow():
            live = [(x, 8)]
            for op, width in zip(ops, widths):
                a, wa = live[-1]
                if op == "matmul":
                    w = relax.const(np.random.default_rng(len(weights)).standard_normal(
                        (wa, width)).astype("float32") * 0.3)
                    weights.append(w)
                    out, wo = bb.emit(relax.op.matmul(a, w)), width
                elif op in ("add", "mul"):
                    same = [v for v, _ in live if str(v.ty.shape) == str(a.ty.shape)]
                    b = same[len(same) // 2]  # an older tensor of the same shape: longer lifetimes
                    f = relax.op.add if op == "add" else relax.op.multiply
                    out, wo = bb.emit(f(a, b)), wa
                elif op == "concat":
                    out, wo = bb.emit(relax.op.concat([a, a], axis=0)), wa
                elif op == "exp":
                    out, wo = bb.emit(relax.op.exp(relax.op.multiply(a, relax.const(0.1, "float32")))), wa
                else:
                    out, wo = bb.emit(relax.op.nn.silu(a)), wa
                live.append((out, wo))
            result = bb.emit_output(relax.Tuple([live[-1][0], live[len(live) // 2][0]]))
        bb.emit_func_output(result)
    return bb.get(), live


def _reference(mod, x):
    vm = relax.VirtualMachine(tvm.compile(mod, LLVM), tvm.cpu())
    return [t.numpy() for t in vm["main"](tvm.runtime.tensor(x))]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(), st.integers(1, 9))
def test_random_graph_plans_never_overlap_and_always_fit(graph, n_value):
    mod, _ = _build(*graph)
    with LLVM:
        planned = tvm.transform.Sequential(UP_TO_PLAN)(mod)
    func = planned["main"]
    requests, _ = collect_requests(func)
    analyzer = _analyzer(func)
    blocks = plan(requests, analyzer)
    for block in blocks:
        members = sorted(block.members, key=lambda r: r.start)
        for a, b in zip(members, members[1:]):  # one block, lifetimes one after another
            assert a.end < b.start
        for r in members:  # fits for every n: proven, and checked at sample values
            assert analyzer.can_prove(block.size >= r.size)
            for n in (0, 1, 2, 7, 100, 4096):
                assert evaluate(r.size, {"n": n}) <= evaluate(block.size, {"n": n})
    # and the planned program computes what the unplanned one does
    x = np.random.default_rng(n_value).standard_normal((n_value, 8)).astype("float32")
    with LLVM:
        arena = tvm.transform.Sequential([*UP_TO_PLAN, PlanSymbolicArena(), *AFTER_PLAN])(mod)
    ex = tvm.compile(arena, LLVM, relax_pipeline=tvm.transform.Sequential([]))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xt = tvm.runtime.tensor(x)
    sizes = [int(s) for s in vm["main_workspace_bytes"](xt)]
    buffers = [tvm.runtime.empty((max(s, 1),), "uint8") for s in sizes]
    got = [t.numpy() for t in vm["main"](xt, *buffers)]
    for g, r in zip(got, _reference(mod, x)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_reuse_across_different_symbolic_sizes():
    """(n, 24) dies, then (n, 16) is born: TVM's planner gives it a new storage, the arena reuses
    the (n, 24) block because 16*n <= 24*n for every n."""
    mod, _ = _build(["matmul", "matmul", "matmul", "matmul"], [24, 8, 16, 8])
    with LLVM:
        planned = tvm.transform.Sequential(UP_TO_PLAN)(mod)
    requests, _ = collect_requests(planned["main"])
    blocks = plan(requests, _analyzer(planned["main"]))
    assert len(blocks) < len(requests)


# -- the real model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_decode_step_allocates_nothing_after_warm_up(artifact):
    counts = {}
    for kv in ("inplace", "copy"):
        eng = Engine(artifact("dynamo", kv), max_context=512)
        counter = StepCounter(eng.vm)
        session = eng.new_session()
        eng.prefill(session, eng.encode_prompt(PROMPTS[0]))
        eng.forward(session, [42])  # warm-up
        counter.reset()
        eng.forward(session, [43])
        assert counter.calls, "the instrument saw the step"
        counts[kv] = counter.allocations
    assert counts["inplace"] == 0
    assert counts["copy"] > 100  # TVM's plan allocates every storage every step


@pytest.mark.slow
def test_decode_plan_does_not_pay_for_the_prefill_bound(export_dir):
    import tvm_lite
    from tvm_lite.memory import plans

    mod = tvm_lite.from_onnx(export_dir("dynamo") / "model.onnx")
    symbolic = plans(mod, bound=2048)
    decode = {k: evaluate(v, {"seq": 1, "past_seq": 2047}) for k, v in symbolic["decode"].items()
              if k != "blocks"}
    prefill = {k: evaluate(v, {"seq": 2048, "past_seq": 0}) for k, v in symbolic["prefill"].items()
               if k != "blocks"}
    assert decode["tvm_lite"] < 0.05 * decode["TVM bound"]  # decode sized for one token
    assert prefill["tvm_lite"] <= prefill["TVM"] < prefill["none"]
    assert prefill["tvm_lite"] <= prefill["TVM bound"]


@pytest.mark.slow
def test_padding_changes_no_token(artifact):
    padded = Engine(artifact("dynamo"), buckets=(16, 32, 64, 128))
    exact = Engine(artifact("dynamo"), buckets=())
    cfg = GenerationConfig(max_new_tokens=24, stop_token_ids=())
    for prompt in PROMPTS:
        a, b = padded.generate(prompt, cfg), exact.generate(prompt, cfg)
        assert a.token_ids == b.token_ids, prompt
    session = padded.new_session()
    padded.prefill(session, list(range(100, 137)))  # 37 tokens
    assert session.last_call == ("prefill", 64) and session.length == 37
