"""tvm_lite's Relax passes, one per file, each named for what it does."""

from .fuse_attention import FuseAttention
from .inplace_kv_cache import InplaceKVCache, KVCacheRewriteError, NoKVCacheError
from .plan_symbolic_arena import PlanSymbolicArena
from .quantize_weight_matmuls import QuantizeWeightMatmuls
from .remove_noop_ops import RemoveNoOpOps
from .split_prefill_decode import SplitPrefillDecode

__all__ = ["FuseAttention", "InplaceKVCache", "KVCacheRewriteError", "NoKVCacheError", "PlanSymbolicArena",
           "QuantizeWeightMatmuls", "RemoveNoOpOps", "SplitPrefillDecode"]
