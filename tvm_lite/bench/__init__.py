"""tvm_lite's benchmarks. None of the compiler core imports them.

    generation.py  the engine's generation loop measured (tvm-lite bench [ARTIFACT], bench-kv,
                   interleaved builds) and onnxruntime's, tables
    models.py      whole models on a GPU: tvm_lite E0M4/int4 vs stock TVM vs PyTorch, same run
                   (python -m tvm_lite.bench.models)
    kernels.py     tvm-lite bench-kernels: per-kernel GEMV/GEMM speed vs stock DLight (GPU)
    cpu_gemv.py    CPU decode GEMVs, weights as exported vs panel-major, fp32 and E0M4
                   (python -m tvm_lite.bench.cpu_gemv)
    greedy.py      the greedy token's argmax kernel on a GPU, with and without its rule
                   (python -m tvm_lite.bench.greedy)
    last_row.py    what prefill_last buys: a prefill's last logits alone vs every row's
                   (python -m tvm_lite.bench.last_row)
    gpu_slice.py   what gpu_slice buys: the longest kernel and submission of a long prefill
                   (python -m tvm_lite.bench.gpu_slice ARTIFACT --device cuda)
    grid_model.py  a list-scheduling model of a prefill attention grid: launch order and prompt
                   splits, without a GPU (python -m tvm_lite.bench.grid_model)
"""

from .generation import (bench_engine, bench_interleaved, bench_kv_cache, bench_onnxruntime,
                         bench_tvm, format_rows, format_table, generate_tokens, prompt_ids)

__all__ = ["bench_engine", "bench_interleaved", "bench_kv_cache", "bench_onnxruntime", "bench_tvm",
           "format_rows", "format_table", "generate_tokens", "prompt_ids"]
