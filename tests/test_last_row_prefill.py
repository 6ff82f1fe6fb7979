"""AddLastRowPrefill (relax_passes/add_last_row_prefill.py): ``prefill_last`` runs the row-local
tail of ``prefill`` (the ops after the last one that mixes rows) on the last real row only, and
its logits are that row of ``prefill``'s. The engine's greedy prefill (``prefill_step``) runs it:
test_kv_cache.py's greedy test and the architecture matrix check its tokens on real exports."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I, relax as R, tirx as T

import tvm_lite
from tvm_lite.convention import KV_CACHE_ATTR, PREFILL, PREFILL_LAST
from tvm_lite.relax_passes import AddLastRowPrefill


def _prefill(mix_last: bool):
    """An in-place prefill in the exported interface: embedding, a row-mixing op (cumsum along
    the sequence stands in for attention), the residual add, an RMSNorm by hand, the lm_head and
    a soft-capping. ``mix_last``: the capped logits are mixed along the sequence (no tail)."""
    mix_axis = 1 if mix_last else 2  # a cumsum along the vocabulary mixes no rows (kept, cut)

    @I.ir_module
    class Mod:
        @R.function
        def prefill(input_ids: R.Tensor((1, "seq"), "int64"),
                    attention_mask: R.Tensor((1, "past_seq + seq"), "int64"),
                    position_ids: R.Tensor((1, "seq"), "int64"), past_len: R.Shape(["past_seq"]),
                    emb: R.Tensor((50, 8), "float32"), norm_w: R.Tensor((8,), "float32"),
                    head: R.Tensor((8, 50), "float32")):
            R.func_attr({"num_input": 4, KV_CACHE_ATTR: ["cache"]})
            seq = T.int64()
            with R.dataflow():
                x = R.reshape(R.take(emb, R.reshape(input_ids, R.shape([seq])), axis=0),
                              R.shape([1, seq, 8]))
                mixed = R.cumsum(x, axis=1)
                h = R.add(x, R.multiply(mixed, R.const(0.5, "float32")))
                ms = R.mean(R.multiply(h, h), axis=[-1], keepdims=True)
                normed = R.multiply(norm_w, R.multiply(h, R.rsqrt(R.add(ms, R.const(1e-5, "float32")))))
                logits = R.matmul(normed, head)
                capped = R.multiply(R.tanh(R.divide(logits, R.const(3.0, "float32"))),
                                    R.const(3.0, "float32"))
                gv = (R.cumsum(capped, axis=mix_axis),)
                R.output(gv)
            return gv

    return Mod


def test_last_row_prefill_computes_the_last_real_rows_logits():
    add = AddLastRowPrefill(KV_CACHE_ATTR)
    mod = add(_prefill(mix_last=False))
    text = mod[PREFILL_LAST].script()
    # the tail (residual add, norm, lm_head, capping; not the cumsums) runs on one row
    assert "R.cumsum(x, axis=1" in text and add.tail_ops > 8
    assert 'R.Tensor((1, 1, 50), dtype="float32") = R.matmul' in text
    ex = tvm_lite.build(mod, "llvm", kv_cache="copy", memory_plan="tvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    weights = [tvm.runtime.tensor(rng.standard_normal(s).astype("float32"))
               for s in ((50, 8), (8,), (8, 50))]
    past, real, seq = 2, 3, 5  # 3 real tokens after 2 cached ones, then 2 of padding
    ids = tvm.runtime.tensor(rng.integers(0, 50, (1, seq)).astype("int64"))
    mask = np.zeros((1, past + seq), "int64")
    mask[0, :past + real] = 1
    args = [ids, tvm.runtime.tensor(mask),
            tvm.runtime.tensor(np.arange(past, past + seq)[None].astype("int64")),
            tvm.runtime.ShapeTuple([past]), *weights]
    full = vm[PREFILL](*args)[0].numpy()
    last = vm[PREFILL_LAST](*args)[0].numpy()
    assert last.shape == (1, 1, 50)
    np.testing.assert_allclose(last[0, 0], full[0, real - 1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(last[0, 0], full[0, seq - 1])  # not the padded last row


def test_no_last_row_prefill_where_the_logits_mix_rows():
    add = AddLastRowPrefill(KV_CACHE_ATTR)
    mod = add(_prefill(mix_last=True))
    assert PREFILL_LAST not in {gv.name_hint for gv in mod.get_global_vars()}


@pytest.mark.slow
def test_the_real_models_tail_is_its_last_layers_mlp_and_the_lm_head(export_dir):
    """SmolLM2: the last layer's o-projection, MLP (merged gate/up, down) and the lm_head run on
    one row: four matmuls; the layer's residual input and attention output are cut."""
    from tvm_lite.artifact import weights_as_built
    from tvm_lite.pipeline import phases

    mod = tvm_lite.from_onnx(export_dir("dynamo") / "model.onnx")
    mod = tvm_lite.detach_params(weights_as_built(mod, progress=None))[0]
    _, passes = phases(tvm.target.Target({"kind": "llvm"}), "inplace", fusion=False)[0]
    mod = tvm.transform.Sequential(passes)(mod)
    text = mod[PREFILL_LAST].script()
    one_row = [line for line in text.splitlines() if "R.Tensor((1, 1," in line]
    assert sum("R.matmul(" in line for line in one_row) == 4
    assert sum("R.take(" in line and 'mode="clip"' in line for line in one_row) == 2


@pytest.mark.slow
def test_the_real_models_fill_prefill_writes_the_caches_and_computes_no_logits(export_dir):
    """SmolLM2: ``prefill_fill`` (what a prompt's chunks before its last run) returns its
    cache writes, and dead code takes what only the logits needed: the last layer's attention,
    o-projection and MLP (merged gate/up, down) and the lm_head, four matmuls of ``prefill``'s."""
    from tvm_lite.artifact import weights_as_built
    from tvm_lite.convention import PREFILL_FILL
    from tvm_lite.pipeline import phases

    mod = tvm_lite.from_onnx(export_dir("dynamo") / "model.onnx")
    mod = tvm_lite.detach_params(weights_as_built(mod, progress=None))[0]
    _, passes = phases(tvm.target.Target({"kind": "llvm"}), "inplace", fusion=False)[0]
    mod = tvm.transform.Sequential(passes)(mod)
    fill, full = mod[PREFILL_FILL], mod[PREFILL]
    caches = len(full.attrs[KV_CACHE_ATTR])
    assert isinstance(fill.ret_ty, relax.TupleType) and len(fill.ret_ty.fields) == caches
    assert [p.name for p in fill.params] == [p.name for p in full.params]
    matmuls = [f.script().count("R.matmul(") for f in (full, fill)]
    assert matmuls[1] == matmuls[0] - 4, matmuls
    attention = [f.script().count("attention_prefill") for f in (full, fill)]
    assert attention[1] == attention[0] - 1, attention
