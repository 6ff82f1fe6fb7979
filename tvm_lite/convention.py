"""The calling convention between a compiled model and its caller: every name, in one place.

The passes that write a module's entry points (``relax_passes/``), the pass that describes them
(``relax_passes/attach_metadata.py``), the engine that calls them, the artifact's manifest and the
RPC code all spell these names through this module, never as literals.

Entry points of an in-place decoder (``kv_cache="inplace"``), in the order the pipeline adds them::

    prefill(ids, mask, positions, past_len, *caches, *workspace, *weights) -> logits
    prefill_last(the same) -> the logits of the last row whose mask is 1 (1, 1, vocab)
    decode(ids, mask, positions, past_len, *caches, *workspace, *weights) -> logits
    prefill_workspace_bytes / decode_workspace_bytes(...) -> R.Shape([bytes of each buffer])
    prefill_tupled / prefill_last_tupled / decode_tupled(ids, mask, positions, past_len, caches,
                                                         [workspace], weights)
    alloc_kv_caches(R.Shape([cache_len])), alloc_workspace(R.Shape(sizes)), alloc_params()
    prefill_step(ids, R.Shape([past, real]), caches, [workspace], weights) -> int
    decode_step(R.Shape([token, past]), caches, [workspace], weights) -> int
    prefill_step_flat / decode_step_flat(the same, *caches, *workspace, *weights) -> int
    decode_chain(token: R.Tensor((1,), "int64"), R.Shape([past]), caches, [workspace], weights)
        -> R.Tensor((1,), "int64")         # the greedy token stays on the device
    decode_chain_flat(the same, *caches, *workspace, *weights)
    decode_padded(tokens: R.Tensor((n,), "int64"), position: R.Tensor((1,), "int64"),
                  R.Shape([past]), caches, [workspace], weights) -> R.Tensor((1,), "int64")
        # feeds tokens[position], attends over past + 1 keys (a bucket; the keys after position
        # masked), writes tokens[position + 1] and position += 1 on the device: CUDA graphs
    decode_padded_flat(the same, *caches, *workspace, *weights)
    _metadata() -> str                    # the JSON description of all of the above

A past/present decoder (``kv_cache="copy"``) has ``main`` (and ``decode``, ``main`` with one
token, when it was built with a tuning database) and ``_metadata``.

Importing this module imports nothing else: a runtime-only TVM process reads it too.
"""

from __future__ import annotations

# -- entry points -------------------------------------------------------------------------------
MAIN = "main"  # the imported model; a past/present build's entry
PREFILL = "prefill"
DECODE = "decode"
DECODERS = (PREFILL, DECODE)
# prefill with the logits of the last real row only (relax_passes/add_last_row_prefill.py): what
# prefill_step runs where the model has it
PREFILL_LAST = "prefill_last"
# prefill that writes the K/V cache and computes no logits (relax_passes/add_cache_fill_prefill.py):
# what prefill_chain runs, a prompt's chunks before its last
PREFILL_FILL = "prefill_fill"

TUPLED_SUFFIX = "_tupled"  # caches, workspace and weights as tuples (RPC)
STEP_SUFFIX = "_step"  # ints in, the greedy token out
FLAT_SUFFIX = "_flat"  # a *_step entry taking the buffers as separate arguments (in-process calls)
WORKSPACE_BYTES_SUFFIX = "_workspace_bytes"  # sizes of a decoder's workspace buffers


def tupled(decoder: str) -> str:
    return decoder + TUPLED_SUFFIX


def step(decoder: str) -> str:
    return decoder + STEP_SUFFIX


def flat(entry: str) -> str:
    return entry + FLAT_SUFFIX


def step_decoder(decoder: str, functions, fill: bool = False) -> str:
    """The decoder a ``<decoder>_step`` entry runs among ``functions`` (names): ``prefill_last``
    for prefill where the module has it (the greedy token needs one row's logits); with ``fill``
    (``prefill_chain``: a chunk before a prompt's last) ``prefill_fill`` where it has that."""
    if decoder == PREFILL and fill and PREFILL_FILL in functions:
        return PREFILL_FILL
    return PREFILL_LAST if decoder == PREFILL and PREFILL_LAST in functions else decoder


def workspace_bytes(function: str) -> str:
    return function + WORKSPACE_BYTES_SUFFIX


PREFILL_TUPLED, DECODE_TUPLED = tupled(PREFILL), tupled(DECODE)
PREFILL_STEP, DECODE_STEP = step(PREFILL), step(DECODE)
PREFILL_STEP_FLAT, DECODE_STEP_FLAT = flat(PREFILL_STEP), flat(DECODE_STEP)
# a decode step whose token comes from and goes to the device (no host read): steps queue
# back to back, the host reads their tokens a few steps later (Engine(run_ahead=...))
DECODE_CHAIN = "decode_chain"
DECODE_CHAIN_FLAT = flat(DECODE_CHAIN)
# a prefill chunk that writes its K/V rows and returns nothing the host reads (prefill_fill where
# the module has it, else a greedy token left on the device): a prompt's chunks before its last
# queue back to back, without the GPU waiting for the host between them
PREFILL_CHAIN = "prefill_chain"
PREFILL_CHAIN_FLAT = flat(PREFILL_CHAIN)
# a decode step on a context padded to a bucket, its token and position read from device buffers
# and advanced there: every step of a bucket is the same call, replayed as a CUDA graph
DECODE_PADDED = "decode_padded"
DECODE_PADDED_FLAT = flat(DECODE_PADDED)
PADDED_BUCKET = 64  # decode_padded's contexts are padded to multiples of this many keys

ALLOC_KV_CACHES = "alloc_kv_caches"
ALLOC_WORKSPACE = "alloc_workspace"
ALLOC_PARAMS = "alloc_params"
TUPLED_ENTRIES = (ALLOC_KV_CACHES, PREFILL_TUPLED, DECODE_TUPLED)  # what RPC needs, in place

# the step helpers (relax_passes/add_step_helpers.py), called by the *_step entries
STEP_TOKEN_IDS = "step_token_ids"
STEP_INPUTS = "step_inputs"
GREEDY_TOKEN = "greedy_token"
PADDED_INPUTS = "padded_step_inputs"  # decode_padded's ids, mask and positions from device state
ADVANCE_TOKENS = "advance_tokens"  # decode_padded's token history and position, advanced in place

METADATA = "_metadata"  # () -> JSON string: the calling convention (relax_passes/attach_metadata.py)
METADATA_VERSION = 1

# -- parameter names of the decoders ------------------------------------------------------------
PAST_LEN = "past_len"  # the in-place write offset (a shape argument)
WORKSPACE_PREFIX = "workspace_"  # workspace_<i>: the planned activation buffers
INPUTS = ("input_ids", "attention_mask", "position_ids")  # the exported decoder's inputs

# -- function attributes ------------------------------------------------------------------------
NORM_ROW_STAT_BLOCK = "sum_sq"  # the sum-of-squares block of tvm_lite's RMSNorm kernels
KV_CACHE_ATTR = "tvm_lite.kv_cache_names"  # set by InplaceKVCache on the decoders it rewrote
KV_WINDOW_ATTR = "tvm_lite.kv_windows"  # the sliding window of each cache (0: none), same order
INPUT_NAMES_ATTR = "tvm_lite.input_names"
OUTPUT_NAMES_ATTR = "tvm_lite.output_names"
PARAM_NAMES_ATTR = "tvm_lite.param_names"
# set by DecodeWritesAtPosition: decode writes its K/V row at positions[0, 0], read on the device
WRITES_AT_POSITION_ATTR = "tvm_lite.writes_at_position"

# -- KV-cache modes -----------------------------------------------------------------------------
KV_INPLACE = "inplace"  # one cache per layer, written at past_len (relax_passes/inplace_kv_cache.py)
KV_COPY = "copy"  # the exported past/present interface
KV_AUTO = "auto"  # in place when the model has a past/present interface (tvm_lite.build on any module)


# -- weight layouts ------------------------------------------------------------------------------
# a gated MLP's merged gate+up weight, interleaved: columns in blocks of this many, gate's block q
# at 2q and up's at 2q + 1 (relax_passes/merge_shared_input_projections.py); 8 fp16 columns are one
# 16-byte vector and one n8 tile of a CUDA MMA
GATE_BLOCK = 8
