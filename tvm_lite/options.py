"""Build options: one typed object from the command line to ``compile_model`` to ``build`` to the
pipeline, with every default written here once.

    opts = BuildOptions(kv_cache="copy", fusion=False)
    tvm_lite.build(mod, "llvm", options=opts)            # or tvm_lite.build(mod, "llvm", kv_cache="copy")
    compile_model(folder, "llvm", options=opts)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .convention import KV_AUTO, KV_COPY, KV_INPLACE

KV_CACHE_MODES = (KV_AUTO, KV_INPLACE, KV_COPY)
MEMORY_PLANS = ("arena", "tvm")
PIPELINES = ("tvm_lite", "stock")
PDL_GRAPHS = "graphs"  # dependent_launch for the CUDA-graph functions' kernels only
PDL_AUTO = "auto"  # dependent_launch: PDL_GRAPHS where the target has it, else off (the default)


@dataclass(frozen=True)
class BuildOptions:
    """How a model is compiled.

    ``kv_cache``: ``"auto"`` (default) rewrites a decoder's past/present KV interface into one
    in-place cache per layer when the model has one (``relax_passes/inplace_kv_cache.py``),
    ``"inplace"`` insists on it (an error if the model has none), ``"copy"`` keeps the exported
    past/present interface. An in-place decoder comes out as ``prefill`` and ``decode``.
    ``memory_plan``: ``"arena"`` plans prefill's and decode's activations into workspace buffers
    the caller allocates once (``relax_passes/plan_symbolic_arena.py``); ``"tvm"`` keeps TVM's
    StaticPlanBlockMemory alone.
    ``fusion``: tvm_lite's pattern fusion passes (``relax_passes/fuse_*.py``); False compiles with
    FuseOps alone (for comparisons).
    ``fused_attention``: each layer's attention on the in-place cache as one kernel, or the
    exported op-by-op graph (False); no effect on a past/present build.
    ``quant``: a ``tvm_lite.quant.QuantConfig`` (4-bit weights; ``compile_model`` only) or None.
    ``tuning_db``: a MetaSchedule database directory (``tvm-lite tune``) whose kernels replace
    tvm_lite's schedules where they measured faster.
    ``decode_function``: give a past/present decoder a ``decode`` function too (``main`` with one
    token); default: on with a tuning database.
    ``kv_windows``: the sliding window of each layer (0 for a global layer) whose in-place cache
    is a ring of ``window`` rows (``relax_passes/fuse_attention.py: ring_kernel``; every target:
    ``schedules/gpu_attention*.py`` rebuild the ring kernels for a GPU); ``()``: no ring caches
    (full-length caches with the window in the export's mask);
    None (default): ``compile_model`` takes them from the export (``tvm_lite_model.json``).
    ``merge_projections``: projections that read the same activation (q/k/v, gate/up) become one
    wider matmul (``relax_passes/merge_shared_input_projections.py``; ``compile_model`` applies
    it to the imported module, after quantization); False keeps one matmul per weight.
    ``pipeline``: ``"tvm_lite"``, or ``"stock"``: TVM's default pipeline (the benchmarks'
    baseline; past/present KV, TVM's memory plan; the other options do not apply).
    ``weight_panels``: on a CPU target, store each weight matrix panel-major, the columns one
    task computes contiguous (``relax_passes/pack_weight_panels.py``; ``compile_model`` only,
    which has the weights); False keeps the exported ``[K, N]`` layout (for comparisons).
    ``dependent_launch``: on CUDA sm_90+, every kernel launched with programmatic dependent
    launch, so that its launch overlaps the tail of the kernel before it
    (``relax_passes/launch_dependents_early.py``); ``"graphs"``: only the kernels of the
    functions the engine replays as CUDA graphs (``decode_padded``: copies of them,
    ``relax_passes/separate_graph_kernels.py``); True or ``"graphs"`` is an error on another
    target. ``"auto"`` (default): ``"graphs"`` on CUDA sm_90+, off elsewhere
    (``pipeline.resolved``). Launched one by one, every kernel cost more with it (SmolLM2's
    prefill 2.90 -> 3.48 ms, H200, session 18); replayed as graphs, a step cost less (SmolLM2
    decode 0.600 -> 0.547 ms, H100, session 24).
    """

    kv_cache: str = KV_AUTO
    memory_plan: str = "arena"
    fusion: bool = True
    fused_attention: bool = True
    quant: object = None
    tuning_db: str | Path | None = None
    decode_function: bool | None = None
    kv_windows: tuple | None = None
    merge_projections: bool = True
    pipeline: str = "tvm_lite"
    weight_panels: bool = True
    dependent_launch: bool | str = PDL_AUTO

    def __post_init__(self):
        for name, value, allowed in (("kv_cache", self.kv_cache, KV_CACHE_MODES),
                                     ("memory_plan", self.memory_plan, MEMORY_PLANS),
                                     ("pipeline", self.pipeline, PIPELINES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {allowed}")
        if not (isinstance(self.dependent_launch, bool)
                or self.dependent_launch in (PDL_GRAPHS, PDL_AUTO)):
            raise ValueError(f"dependent_launch={self.dependent_launch!r}: expected False, True, "
                             f"{PDL_GRAPHS!r} or {PDL_AUTO!r}")
        if self.kv_windows is not None:
            windows = tuple(self.kv_windows)
            if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in windows):
                raise ValueError(f"kv_windows={self.kv_windows!r}: expected one window per layer, "
                                 "each an int >= 0 (0: a global layer)")
            object.__setattr__(self, "kv_windows", windows)

    @classmethod
    def of(cls, options: "BuildOptions | None" = None, **overrides) -> "BuildOptions":
        """``options`` (default: the defaults) with the keyword arguments that are not None
        replacing its fields: how ``build``/``compile_model`` keep their keyword arguments."""
        base = options if options is not None else cls()
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown build options {sorted(unknown)}")
        return dataclasses.replace(base, **given)

    def replace(self, **changes) -> "BuildOptions":
        return dataclasses.replace(self, **changes)

    @property
    def stock(self) -> bool:
        return self.pipeline == "stock"

    def to_dict(self) -> dict:
        """The options as JSON values (what the artifact's manifest and metadata record);
        ``quant`` as its own dict, ``tuning_db`` as a path string."""
        out = dataclasses.asdict(self)
        out["quant"] = self.quant.to_dict() if self.quant is not None else None
        out["tuning_db"] = str(self.tuning_db) if self.tuning_db is not None else None
        return out
