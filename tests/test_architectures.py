"""Other decoder architectures go through the same code (no model code per architecture):
tiny random-weight models built from transformers configs, exported, compiled, and compared with
torch logit by logit."""

import glob
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SMALL = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.mark.parametrize("arch, extra, exporter", [
    ("qwen2", {"tie_word_embeddings": False}, "torchscript"),  # attention biases, untied lm_head
    ("qwen3", {"head_dim": 32}, "dynamo"),  # QK norms, head_dim != hidden / heads
])
def test_tiny_decoders_match_torch(arch, extra, exporter, tmp_path, export_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import tvm_lite

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **SMALL, **extra)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    src = tmp_path / arch
    model.save_pretrained(src)
    for f in glob.glob(str(export_dir("dynamo") / "tokenizer*")):  # any tokenizer will do
        shutil.copy(f, src)
    onnx_dir = tvm_lite.export_onnx(src, out_dir=tmp_path / "onnx", exporter=exporter,
                                    progress=lambda _: None)
    art = tvm_lite.compile_model(onnx_dir, "llvm", out_dir=tmp_path / "art", progress=lambda _: None)
    engine = tvm_lite.Engine(art)
    ids = [5, 17, 300, 42, 9, 1000, 7]
    session = engine.new_session()
    first = engine.prefill(session, ids[:4])
    rest = engine.forward(session, ids[4:])  # continues from a non-empty past
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(first, ref[3], atol=1e-4)
    np.testing.assert_allclose(rest, ref[4:], atol=1e-4)
