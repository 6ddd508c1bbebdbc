"""The bidirectional Mamba mixer ("bimamba v2") with its memory-bound parts fused in Triton.

Per direction d (0: left to right, 1: right to left) and channel e, state n:

    u_d   = silu(causal depthwise conv_d(x))       (direction 1: the conv is causal in reversed order)
    delta = softplus(dt_d + bias_d),  dt_d = dt_proj_d(x_proj_d(u_d)[:R])  (matmuls stay on cuBLAS)
    h_s   = exp(delta_s A_d) h_{s-1} + delta_s B_s u_s        (s runs over the tokens in direction d's order)
    y_d   = C_s . h_s + D_d u_s
    out   = out_proj((y_0 + y_1) * silu(z))                   (no division by 2, as the official VideoMamba)

Triton kernels do everything between the matmuls:
- `_pack_direction`: each direction's 7 parameters into the stacked, cast and padded layouts the other kernels take
  (`packed_params`, one launch per direction);
- `_conv_fwd`: both directions' conv + SiLU in one pass over x; `_conv_dp`, `_conv_dx`: its backward in two passes
  (the pre-activations recomputed from x, not saved);
- `_scan_fwd`: one program per (channel block, segment, direction, batch row) runs the recurrence token by token
  with the state in registers: lanes along 32 channels (64 in the forward's passes, two a lane), the 16 states of a
  channel inside its thread, so C.h and the other sums over states need no communication. State buffers are
  state-major, (N, E), with their alignment hidden from Triton (`_state_offsets`): that is what gives this layout
  under every Triton version. Direction 1 runs by reversed indexing (no flipped copies). A chunk's
  loads are issued together and one chunk ahead (prefetch), B and C come from one contiguous [B, C] tensor as
  16-byte vector loads. It writes each direction's y; `_gate` adds them and applies SiLU(z).
- `_scan_bwd`: per chunk in reverse scan order, the chunk's states are recomputed from the state entering it
  (kept in registers as a tuple), then the adjoint runs back through them; du, d(dt) and (in direction 0's
  programs) dz are written, dB and dC are summed over a warp's 32 channels by a shuffle reduce-scatter (31 shuffles
  instead of 160 for a sum per state) and added atomically, one atomic per lane.
- The states entering every chunk are not kept from the forward pass: the backward pass recomputes them into a
  transient buffer (`_chunk_states`, in the input dtype by default; bf16 as pairs in 32-bit words, `_save_state`),
  one direction at a time, so one direction's per-chunk states never outlive its backward.

Parallelism along the sequence: when batch rows x channel blocks are too few to fill the GPU, the sequence is cut
into segments. In the forward pass a summary pass gives each segment's local final state and its sum of delta; in
the backward pass the state-recompute pass also gives each segment's local adjoint (linear in the C g terms, so it
is summed in scan order, no extra reverse pass). `_carry` chains them, and the main pass starts each segment from
its carry.

Files: `kernels` are `primitives.py` (PTX helpers, geometry), `scan_kernels.py` and `conv_kernels.py` (with the
parameter packing); `launch.py` launches them; `autograd.py` holds the autograd functions; `reference.py` the naive
fp64 recurrences and the plain PyTorch mixer they are tested against (tests/models/test_bimamba_triton.py, bench/);
`config.py` the tile sizes.

History and measurements: bench/NOTES.md (v1 used `tl.associative_scan` over chunk tiles and was 2-4x slower than
mamba-ssm).
"""
from __future__ import annotations

from pipeline.models.ops.bimamba.autograd import bidirectional_selective_scan, bimamba_forward
from pipeline.models.ops.bimamba.config import DEFAULT_CONFIG, ScanConfig
from pipeline.models.ops.bimamba.launch import (SCAN_PASSES, conv_silu, conv_silu_backward, packed_params,
                                                pass_constants, scan_backward, scan_forward, segment_count)

__all__ = ["DEFAULT_CONFIG", "SCAN_PASSES", "ScanConfig", "bidirectional_selective_scan", "bimamba_forward",
           "conv_silu", "conv_silu_backward", "packed_params", "pass_constants", "scan_backward", "scan_forward",
           "segment_count"]
