"""tvm_lite's Relax passes, one per file, each named for what it does (and one TIR pass on the
device module: LaunchDependentsEarly)."""

from .add_decode_function import AddDecodeFunction
from .add_cache_fill_prefill import AddCacheFillPrefill
from .add_last_row_prefill import AddLastRowPrefill
from .add_step_entries import AddStepEntries
from .add_step_helpers import AddStepHelpers
from .add_tupled_buffer_entries import AddTupledBufferEntries
from .attach_metadata import AttachMetadata
from .bind_dequant_kernel_shapes import BindDequantKernelShapes
from .decode_writes_at_position import DecodeWritesAtPosition
from .drop_kills_without_storage import DropKillsWithoutStorage
from .fuse_add_rms_norm import FuseAddRMSNorm
from .fuse_kv_append import FuseKVAppend
from .fuse_rotary import FuseRotary
from .fuse_silu_mul import FuseSiluMul
from .fuse_attention import FuseAttention
from .fuse_gated_epilogue import FuseGatedEpilogue
from .fuse_gemv_prologue import FuseGEMVPrologue
from .inline_step_calls import InlineStepCalls
from .launch_dependents_early import LaunchDependentsEarly
from .inplace_kv_cache import InplaceKVCache, KVCacheRewriteError, NoKVCacheError
from .legalize_grouped_reshape import LegalizeGroupedReshape
from .merge_shared_input_projections import MergeSharedInputProjections
from .pack_weight_panels import PackWeightPanels
from .plan_symbolic_arena import PlanSymbolicArena
from .quantize_weight_matmuls import QuantizeWeightMatmuls
from .remove_noop_ops import RemoveNoOpOps
from .separate_graph_kernels import SeparateGraphKernels
from .share_host_values import ShareHostValues
from .split_prefill_decode import SplitPrefillDecode

__all__ = ["AddCacheFillPrefill", "AddDecodeFunction", "AddLastRowPrefill", "AddStepEntries",
           "AddStepHelpers",
           "AddTupledBufferEntries", "AttachMetadata",
           "BindDequantKernelShapes", "DecodeWritesAtPosition", "DropKillsWithoutStorage",
           "FuseAddRMSNorm", "FuseAttention", "FuseGatedEpilogue", "FuseGEMVPrologue",
           "FuseKVAppend", "FuseRotary", "FuseSiluMul", "InlineStepCalls", "InplaceKVCache",
           "KVCacheRewriteError", "LaunchDependentsEarly", "LegalizeGroupedReshape",
           "MergeSharedInputProjections", "NoKVCacheError", "PackWeightPanels",
           "PlanSymbolicArena", "QuantizeWeightMatmuls", "RemoveNoOpOps", "SeparateGraphKernels",
           "ShareHostValues",
           "SplitPrefillDecode"]
