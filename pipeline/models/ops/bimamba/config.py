"""The tile sizes, register caps and other choices of the fused bidirectional scan's kernels."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScanConfig:
    """Tile sizes of the kernels; `segments` = 0 lets `segment_count` choose."""
    block_t: int = 1  # tokens per chunk; the fastest fwd+bwd at both benchmark shapes on the H200 (bench/NOTES.md)
    block_e: int = 32  # channels per program, one per lane: 32 with one warp turns on the dB/dC reduce-scatter
    # the same for the forward's two passes: with 64, two channels a lane share the loads and conversions of B and
    # C (summary and output passes 10-15% faster on the H200, bench/NOTES.md)
    fwd_block_e: int = 64
    num_warps: int = 1
    keep_decay: bool = True  # the backward keeps each chunk's decays in registers instead of recomputing them
    prefetch: bool = True
    # Each scan pass's cap on registers per thread (Triton's maxnreg; 0 leaves it to ptxas), for occupancy.
    # The backward's state-recompute pass: at 128, 4 warps a scheduler. Uncapped, ptxas gives it 164 at
    # VideoMamba-Ti's training shapes (batch 4, 384 channels: 3 warps), 8-10% slower there on the H200. At other
    # shapes the cap cost 3-7% (bench/NOTES.md, v7)
    state_pass_registers: int = 128
    # the forward's summary pass: left alone, ptxas holds it at 128 registers by sinking the next token's loads to
    # the end of the loop, so it waits on memory. At 168 it issues them early: (8, 1152, 1569) 373 -> 263 us, the
    # same at VideoMamba-Ti's shapes and (1, 384, 12545) (bench/NOTES.md, v7)
    summary_pass_registers: int = 168
    # the forward's output pass: ptxas picks 127 and sinks the next token's loads below the recurrence; at 128 they
    # stay early, 2-3% faster at VideoMamba-Ti's shapes and (8, 1152, 1569) (bench/NOTES.md, v8)
    output_pass_registers: int = 128
    # the backward: ptxas gives it 255, 2 warps a scheduler. Capped at 168 (3 warps, no spills) or 128 (4 warps,
    # spills) it was 9-31% slower on the H200 (bench/NOTES.md, v8)
    backward_pass_registers: int = 0
    conv_block_t: int = 64  # the forward conv's tiles (tokens, channels) and warps
    conv_block_e: int = 64
    conv_warps: int = 4  # (1.4x faster than with 8 on the H200)
    # the conv backward's two passes: dp in tiles of (8, 64), 16 tiles a program, 2 warps; dx in (16, 128) tiles,
    # 4 warps (bench/conv.py's sweep on the H200: both passes 209 -> 186 us at VideoMamba-Ti's 64-frame shape)
    conv_dp_block_t: int = 8
    conv_dp_block_e: int = 64
    conv_dp_tiles: int = 16
    conv_dp_warps: int = 2
    conv_dx_block_t: int = 16
    conv_dx_block_e: int = 128
    conv_dx_warps: int = 4
    segments: int = 0
    target_programs: int = 4096
    carry_states: int = 2  # states per program of the serial carry chain across segments (a power of two)
    carry_group: int = 16  # segments whose loads the chain issues at once, ahead of it
    # dtype of the chunk states the backward pass recomputes and reads back: "input" (u's, bf16 under autocast:
    # half the traffic of that buffer, the largest of the backward) or "float32". The recurrences run in fp32 either
    # way; only the states entering dA, d(delta) and dC are rounded.
    saved_states: str = "input"

    def __post_init__(self):
        if self.saved_states not in ("input", "float32"):
            raise ValueError(f"ScanConfig.saved_states must be 'input' or 'float32', not {self.saved_states!r}")
        for name in ("block_e", "fwd_block_e", "carry_states"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ScanConfig.{name} must be a power of two, not {value}")


DEFAULT_CONFIG = ScanConfig()
