import pytest
import tvm

from tvm_lite.target import TargetError, check_codegen, parse_target


@pytest.mark.parametrize(
    "text, kind, keys, host_triple",
    [
        ("llvm", "llvm", {"cpu"}, None),
        ("cuda -arch=sm_90", "cuda", {"cuda", "gpu"}, None),
        ("opencl -device=adreno", "opencl", {"adreno", "opencl", "gpu"}, "aarch64-linux-android"),
        ("opencl -device=mali", "opencl", {"mali", "opencl", "gpu"}, "aarch64-linux-android"),
        ("vulkan", "vulkan", {"vulkan", "gpu"}, None),
        ("vulkan -device=adreno", "vulkan", {"adreno", "vulkan", "gpu"}, "aarch64-linux-android"),
    ],
)
def test_classic_strings(text, kind, keys, host_triple):
    tgt = parse_target(text)
    assert tgt.kind.name == kind
    assert keys <= set(tgt.keys)
    if kind != "llvm":
        assert tgt.host is not None and tgt.host.kind.name == "llvm"
        if host_triple:
            assert tgt.host.attrs["mtriple"] == host_triple
        else:
            assert "android" not in str(tgt.host.attrs.get("mtriple", ""))


def test_cuda_arch_and_llvm_options():
    assert parse_target("cuda -arch=sm_90").attrs["arch"] == "sm_90"
    tgt = parse_target("llvm -mtriple=aarch64-linux-android -mattr=+neon,+dotprod -num-cores=4")
    assert tgt.attrs["mtriple"] == "aarch64-linux-android"
    assert list(tgt.attrs["mattr"]) == ["+neon", "+dotprod"]
    assert tgt.attrs["num-cores"] == 4


def test_bare_llvm_is_this_machine():
    from tvm.target import codegen

    assert parse_target("llvm").attrs["mcpu"] == codegen.llvm_get_system_cpu()


def test_dict_target_and_tvm_target_pass_through():
    assert parse_target({"kind": "opencl", "device": "adreno"}).host.attrs["mtriple"] == "aarch64-linux-android"
    t = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"})
    assert parse_target(t).attrs["arch"] == "sm_80"


def test_vulkan_codegen_missing_is_a_clear_error():
    with pytest.raises(TargetError, match="no vulkan code generator"):
        check_codegen(parse_target("vulkan"))
    check_codegen(parse_target("opencl -device=adreno"))  # OpenCL codegen is in the wheel


def test_build_refuses_vulkan_before_compiling():
    import tvm_lite
    from tvm.script import ir as I, relax as R

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((4,), "float32")):
            return R.add(x, x)

    with pytest.raises(TargetError, match="vulkan"):
        tvm_lite.build(Mod, target="vulkan")


@pytest.mark.parametrize("bad, match", [
    ("llvm -bogus=3", "bogus"),
    ("", "empty"),
    ("opencl device=adreno", "-name=value"),
    ("nokind", "nokind"),
])
def test_bad_targets_name_the_cause(bad, match):
    with pytest.raises(TargetError, match=match):
        parse_target(bad)


def test_local_cuda_target_is_this_gpu_with_hopper_arch_specific():
    """The benchmarks' default target: this GPU's arch, ``sm_90a`` on Hopper (the wgmma GEMMs
    need it); without a GPU, the H200's."""
    from tvm_lite.target import local_cuda_target

    text = local_cuda_target()
    tgt = parse_target(text)
    dev = tvm.cuda(0)
    want = ("sm_" + str(dev.compute_version).replace(".", "")) if dev.exist else "sm_90"
    assert str(tgt.attrs["arch"]) == (want + "a" if want == "sm_90" else want)
