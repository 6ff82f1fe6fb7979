"""tvm_lite's Relax passes, one per file, each named for what it does."""

from .inplace_kv_cache import InplaceKVCache, KVCacheRewriteError, NoKVCacheError
from .remove_noop_ops import RemoveNoOpOps

__all__ = ["InplaceKVCache", "KVCacheRewriteError", "NoKVCacheError", "RemoveNoOpOps"]
