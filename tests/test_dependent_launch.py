"""``dependent_launch``: CUDA sm_90+ kernels launched with programmatic dependent launch
(``relax_passes/launch_dependents_early.py``). Checked here on the build alone: every kernel
waits for its predecessor before its first statement, and the launch tag the runtime reads is
in the compiled module. (Its speed is a GPU measurement: ``tvm-lite profile`` with and without.)
"""

import re

import pytest
import tvm
from tvm.script import tirx as T
from tvm.tirx.build import split_host_device_mods

import tvm_lite
from tvm_lite.errors import UserError
from tvm_lite.pipeline import TIR_PIPELINE_DEPENDENT_LAUNCH
from tvm_lite.relax_passes.launch_dependents_early import PDL_TAG

WAIT, LAUNCH = "tvm_lite_griddep_wait();", "tvm_lite_griddep_launch();"


@T.prim_func
def _two_kernels(a: T.handle, b: T.handle, c: T.handle):
    """A plain kernel, then one with dynamic shared memory (its tag must stay the last)."""
    n = T.int64()
    A = T.match_buffer(a, (n, 64), "float32")
    B = T.match_buffer(b, (n, 64), "float32")
    C = T.match_buffer(c, (n, 64), "float32")
    T.func_attr({"tirx.is_scheduled": True, "global_symbol": "two"})
    for bx in T.thread_binding(n, thread="blockIdx.x"):
        for tx in T.thread_binding(64, thread="threadIdx.x"):
            B[bx, tx] = A[bx, tx] * T.float32(2)
    for bx in T.thread_binding(n, thread="blockIdx.x"):
        for tx in T.thread_binding(64, thread="threadIdx.x"):
            sh = T.alloc_buffer((64,), "float32", scope="shared.dyn")
            sh[tx] = B[bx, tx]
            T.tvm_storage_sync("shared.dyn")
            C[bx, tx] = sh[63 - tx]


def _kernel_bodies(src: str) -> dict:
    """kernel name -> its body's statements (the CUDA C of each ``__global__`` definition)."""
    out = {}
    head = (r"__global__ void (?:__cluster_dims__\([\d, ]+\) )?(?:__launch_bounds__\(\d+\) )?"
            r"(\w+)\([^)]*\) \{\n")
    for m in re.finditer(head, src):
        body = src[m.end():src.index("\n}\n", m.end())]
        out[m.group(1)] = [ln.strip() for ln in body.splitlines() if ln.strip()]
    return out


@pytest.mark.parametrize("arch, taken", [("sm_90a", True), ("sm_90", True), ("sm_80", False)])
def test_each_sm90_kernel_waits_first_and_carries_the_launch_tag(arch, taken):
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    mod = tvm.tirx.transform.BindTarget(target)(tvm.IRModule({"two": _two_kernels}))
    pipeline, _, device = tvm.tirx.get_tir_pipeline(TIR_PIPELINE_DEPENDENT_LAUNCH)
    _, devices = split_host_device_mods(pipeline(mod))
    kernels = {gv.name_hint: [str(t) for t in f.attrs["tirx.kernel_launch_params"]]
               for dmod in devices.values() for gv, f in device()(dmod).functions_items()}
    assert len(kernels) == 2, kernels
    for name, tags in kernels.items():
        assert (PDL_TAG in tags) == taken, (name, tags)
    dyn = [tags for tags in kernels.values() if "tirx.use_dyn_shared_memory" in tags]
    assert len(dyn) == 1 and dyn[0][-1] == "tirx.use_dyn_shared_memory", dyn
    if not taken:
        return
    ex = tvm.compile(tvm.IRModule({"two": _two_kernels}), target=target,
                     tir_pipeline=TIR_PIPELINE_DEPENDENT_LAUNCH)
    bodies = _kernel_bodies(tvm_lite.device_source(ex, "cuda"))
    assert len(bodies) == 2, bodies
    for name, lines in bodies.items():
        assert lines[:2] == [WAIT, LAUNCH], (name, lines[:4])


def test_a_whole_model_built_with_dependent_launch(tiny_decoder):
    """Every kernel of a real model's CUDA build (prefill and decode, attention and 4-bit
    GEMMs included) waits first; the build with it off has no such instruction; the option on
    a target without it is an error that names the option."""
    _, onnx_dir = tiny_decoder
    mod = tvm_lite.from_onnx(onnx_dir / "model.onnx")
    on = _kernel_bodies(tvm_lite.device_source(
        tvm_lite.build(mod, "cuda -arch=sm_90a", dependent_launch=True), "cuda"))
    assert len(on) > 10
    late = {name: lines[:3] for name, lines in on.items() if lines[:2] != [WAIT, LAUNCH]}
    assert not late, late
    off = tvm_lite.device_source(tvm_lite.build(mod, "cuda -arch=sm_90a", dependent_launch=False),
                                 "cuda")
    assert "griddepcontrol" not in off
    for target in ("opencl -device=adreno", "cuda -arch=sm_80", "llvm"):
        with pytest.raises(UserError, match="dependent_launch=True.*sm_90"):
            tvm_lite.build(mod, target, dependent_launch=True)


def test_graphs_mode_takes_only_the_kernels_replayed_as_cuda_graphs(tiny_decoder):
    """``dependent_launch="graphs"`` (the default on CUDA sm_90+, and only there):
    ``decode_padded`` calls copies of its PrimFuncs (named with ``GRAPH_SUFFIX``), and only
    their kernels wait first and carry the launch tag; prefill's and the other decode
    functions' kernels are the build's without it, and no graph kernel is left without the
    wait."""
    from tvm_lite.options import PDL_AUTO, PDL_GRAPHS, BuildOptions
    from tvm_lite.pipeline import phases, resolved
    from tvm_lite.target import parse_target

    assert BuildOptions().dependent_launch == PDL_AUTO
    for target, mode in (("cuda -arch=sm_90a", PDL_GRAPHS), ("cuda -arch=sm_90", PDL_GRAPHS),
                         ("cuda -arch=sm_80", False), ("opencl -device=adreno", False),
                         ("llvm", False)):
        assert resolved(parse_target(target), BuildOptions()).dependent_launch == mode, target
        assert resolved(parse_target(target), BuildOptions(dependent_launch=False)
                        ).dependent_launch is False
    from tvm_lite.relax_passes import SeparateGraphKernels
    from tvm_lite.relax_passes.launch_dependents_early import GRAPH_SUFFIX, is_graph_kernel
    from tvm_lite.relax_passes.separate_graph_kernels import _callees

    _, onnx_dir = tiny_decoder
    mod = tvm_lite.from_onnx(onnx_dir / "model.onnx")
    ex = tvm_lite.build(mod, "cuda -arch=sm_90a")  # the default: "graphs" here
    bodies = _kernel_bodies(tvm_lite.device_source(ex, "cuda"))
    graph = {n: b for n, b in bodies.items() if is_graph_kernel(n)}
    rest = {n: b for n, b in bodies.items() if n not in graph}
    assert len(graph) > 5 and len(rest) > 5, (sorted(graph), sorted(rest))
    late = {n: b[:3] for n, b in graph.items() if b[:2] != [WAIT, LAUNCH]}
    assert not late, late
    early = {n: b[:3] for n, b in rest.items() if WAIT in b}
    assert not early, early
    # the pass on the lowered module: decode_padded calls only copies, decode only originals
    # (shape functions: VMShapeLower's, on the host)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}, host={"kind": "llvm"})
    lowered = mod
    with target:
        for name, passes in phases(target, options=BuildOptions(dependent_launch="graphs")):
            lowered = tvm.transform.Sequential(passes)(lowered)
    prims = {gv.name_hint for gv, f in lowered.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and not gv.name_hint.startswith("shape_func")}
    for name, copies in (("decode_padded", True), ("decode", False), ("prefill", False)):
        called = {gv.name_hint for gv in _callees(lowered[name]) if gv.name_hint in prims}
        assert called and all(c.endswith(GRAPH_SUFFIX) == copies for c in called), (name, called)
    plain = tvm.IRModule({"two": _two_kernels})  # no graph function: left as it is
    tvm.ir.assert_structural_equal(SeparateGraphKernels()(plain), plain)
    with pytest.raises(ValueError, match="dependent_launch='all'"):
        BuildOptions(dependent_launch="all")


def test_compile_model_names_the_option_before_any_work(tiny_decoder, tmp_path):
    """``compile_model(..., dependent_launch=True)`` for a target without it stops before the
    import and the quantizer, naming the option; nothing is written."""
    from tvm_lite.artifact import compile_model

    _, onnx_dir = tiny_decoder
    steps = []
    with pytest.raises(UserError, match="dependent_launch=True"):
        compile_model(onnx_dir, "llvm", out_dir=tmp_path / "out", progress=steps.append,
                      dependent_launch=True)
    assert steps == [] and not (tmp_path / "out").exists()


def test_cli_takes_graphs_and_names_the_option_on_a_target_without_it(tiny_decoder, tmp_path,
                                                                       capsys):
    """``tvm-lite compile --dependent-launch graphs`` for the CPU stops with the option named
    (exit 2, nothing written); a mode it does not know is argparse's usage error."""
    from tvm_lite.cli import main

    _, onnx_dir = tiny_decoder
    out = tmp_path / "out"
    assert main(["compile", str(onnx_dir), "--target", "llvm", "--dependent-launch", "graphs",
                 "--output", str(out)]) == 2
    assert "dependent_launch='graphs'" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["compile", str(onnx_dir), "--dependent-launch", "sometimes"])
    assert "--dependent-launch" in capsys.readouterr().err


def test_cuda_graph_steps_with_dependent_launch_give_the_tokens_without_it(tiny_decoder_fp16,
                                                                            tmp_path):
    """On the GPU, the default build (``"auto"``: on a Hopper GPU the kernels replayed as CUDA
    graphs launch with programmatic dependent launch) generates, as CUDA graphs, the greedy
    tokens of the same model built without it (the same kernels' arithmetic: a kernel that read
    before its predecessor's writes were visible would show), through several buckets."""
    from conftest import cuda_device

    if cuda_device() is None:
        pytest.skip("needs a CUDA device")
    import numpy as np

    from tvm_lite.artifact import compile_model
    from tvm_lite.engine import Engine, GenerationConfig
    from tvm_lite.target import local_cuda_target

    target = local_cuda_target()
    tokens = {}
    for mode in (None, False):  # the default, and off
        art = compile_model(tiny_decoder_fp16, target, out_dir=tmp_path / str(mode),
                            progress=lambda *_: None, dependent_launch=mode)
        eng = Engine(art, device="cuda", max_context=256, cuda_graphs=True)
        if mode is None and "sm_9" in target:
            assert eng.convention["options"]["dependent_launch"] == "graphs"
        cfg = GenerationConfig(max_new_tokens=100, stop_token_ids=())
        tokens[mode] = eng.generate(np.arange(5, 45), cfg).token_ids
    assert len(tokens[None]) == 100 and tokens[None] == tokens[False]
