"""The scan kernels of `pipeline.models.ops.bimamba` compiled for an H100/H200 (sm_90) without a GPU, specialized as
a launch at the given shape specializes them (bf16 inputs, as under autocast): the registers, shared memory and
instructions the GPU will run. Triton's compiler and its bundled ptxas, nvdisasm and cuobjdump run on any machine.
Compiled with the device's own Triton version (on PYTHONPATH ahead of the venv's), the register counts match the
device's ncu exactly (bench/NOTES.md, v7); another version may lay the kernels out differently (v4).

Used by the layout tests (tests/models/test_bimamba_triton.py) and `bench/sass.py`.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pipeline.models.ops.bimamba.config import DEFAULT_CONFIG, ScanConfig
from pipeline.models.ops.bimamba.launch import SCAN_PASSES, _layout, _reduce_scatter_sums, _state_pairs, pass_constants
from pipeline.models.ops.bimamba.scan_kernels import _scan_bwd, _scan_fwd

PASSES = SCAN_PASSES
_FP32_POINTERS = ("a_ptr", "d_ptr", "bias_ptr", "init_ptr", "last_ptr", "dsum_ptr", "mu_ptr", "db_ptr", "dc_ptr",
                  "da_ptr", "dd_ptr", "dbias_ptr")


def compile_pass(name: str, batch: int, length: int, channels: int, states: int = 16,
                 cfg: ScanConfig = DEFAULT_CONFIG):
    """One pass ("summary", "output", "state" or "backward") compiled for sm_90 as the mixer launches it on
    contiguous bf16 u (2, batch, length, channels), [B, C] (2, batch, length, 2 states) and dout (batch, length,
    channels), z and dz with rows 2 channels apart (halves of in_proj's output). Returns Triton's CompiledKernel."""
    u = torch.empty(2, batch, length, channels, device="meta")
    bc = torch.empty(2, batch, length, 2 * states, device="meta")
    lay = _layout(u, torch.empty(2, states, channels, device="meta"), cfg)
    e2, n2 = 2 * channels, 2 * states
    ints = dict(L=length, E=channels, N=states, B_rows=batch, SEG_LEN=lay.seg_len, CHUNKS=lay.chunks,
                s_ud=batch * length * channels, s_ub=length * channels, s_ul=channels,
                s_bd=batch * length * n2, s_bb=length * n2, s_bl=n2, s_bn=1, s_zb=length * e2, s_zl=e2,
                s_gb=length * channels, s_gl=channels, s_dzb=length * e2, s_dzl=e2)
    fn = _scan_bwd if name == "backward" else _scan_fwd
    consts = pass_constants(name, lay, cfg, pairs=_state_pairs(torch.bfloat16, lay),
                               lane_sums=_reduce_scatter_sums(bc, lay, cfg))
    options = {k: consts.pop(k) for k in ("num_warps", "maxnreg") if k in consts}
    consts.update({k: 1 for k, v in ints.items() if v == 1 and k in fn.arg_names})  # as Triton specializes
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            paired = arg == "states_ptr" and consts["PAIRS"]  # bf16 pairs in 32-bit words
            signature[arg] = "*fp32" if arg in _FP32_POINTERS else "*i32" if paired else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # "zero" and "D0" stay unspecialized, as at run time
            signature[arg] = "i32"
            if arg not in ("zero", "D0") and ints[arg] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def ptx_stats(compiled) -> dict:
    """What the PTX and metadata show: shared memory, warp shuffles, SFU lg2 calls and IEEE divisions."""
    ptx = compiled.asm["ptx"]
    return dict(shared=compiled.metadata.shared, shuffles=ptx.count("shfl.sync"),
                sfu_lg2=ptx.count("lg2.approx.ftz.f32"), divisions=ptx.count("div.rn.f32"))


def _nvidia_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_stats(compiled) -> dict:
    """What the machine code shows: registers per thread, and for the kernel's longest loop (the token loop) its
    instruction count, the count of each opcode, and the positions of its global loads (prefetches issued late
    in the loop wait on memory at the next token)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    lines = sass.splitlines()
    labels = {line.strip().rstrip(":"): i for i, line in enumerate(lines) if line.startswith(".L")}
    loop: list = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA `\((\.L\w+)\)", line)
        if target and labels.get(target.group(1), i) < i:
            body = [x.split("*/", 1)[1].strip().rstrip(" ;") for x in lines[labels[target.group(1)]:i + 1]
                    if x.strip().startswith("/*")]
            loop = max(loop, body, key=len)
    opcodes = [ins.split()[1] if ins.startswith("@") else ins.split()[0] for ins in loop]
    return dict(registers=int(re.search(r"REG:(\d+)", usage).group(1)), loop_instructions=len(loop),
                opcodes=Counter(op.split(".")[0] for op in opcodes),
                loads_at=[k for k, op in enumerate(opcodes) if op.startswith("LDG")])
