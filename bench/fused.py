"""The fused bidirectional scan on a GPU: correctness, then the scan and a Ti block stack timed against their floors.

    python -m bench.fused [--quick] [--out DIR]

1. Correctness (fp32 and bf16): `bidirectional_selective_scan` vs the naive fp64 recurrence and, where mamba-ssm
   imports, vs its `selective_scan_fn` run once per direction on flipped inputs (outputs and gradients); the whole
   mixer (`bimamba_forward`) vs the plain fp64 construction.
2. The scan, forward and forward+backward, at (B=8, E=1152, L=1569, N=16) and (B=1, E=384, L=12545, N=16) in bf16,
   for a few tile configurations, beside mamba-ssm (two calls on pre-flipped inputs) and the memory floor:
   the bytes the op must move (every input read once, every output written once) / 3.0 TB/s. Forward+backward
   also as one CUDA graph: at (1, 384, 12545) the eager call is bound by the host's launches, not the GPU.
3. 24 blocks of width 192 (Ti), bf16 autocast, forward+backward at 8 and 64 frames (196 patches + cls per frame,
   64/frames clips per batch): the fused BiMamba stack vs an SDPA ViT-Ti stack (and the plain mamba-ssm BiMamba
   stack where it imports): ms per clip, clips/s and peak memory.
Prints a table at the end and writes everything as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.ops.bimamba import ScanConfig, bidirectional_selective_scan, bimamba_forward
from pipeline.models.ops.bimamba.reference import TinyBiMixer, naive_bidirectional_scan, rel, scan_inputs

STACK_CONFIG = [ScanConfig()]  # replaced by the fastest configuration of the scan sweep
BANDWIDTH = 3.0e12  # bytes/s, a device-to-device copy on the lent H100 (/work/shared/GPU.md)
SCAN_SHAPES = [(8, 1152, 1569, 16), (1, 384, 12545, 16)]
CONFIGS = [ScanConfig(block_t=t, target_programs=p, backward_pass_registers=r)
           for t, p, r in ((2, 4096, 0), (1, 2048, 0), (1, 4096, 168), (1, 4096, 128), (2, 4096, 168), (1, 8192, 168))]


def mamba_scan_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn
    except Exception as exc:  # not built on this machine
        print(f"mamba-ssm not importable: {exc!r}")
        return None


def bench_ms(fn, grads=None) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=200, grad_to_none=grads, return_mode="median")


# ------------------------------------------------------------------------------------------------ correctness
def check_vs_naive(b, l, e, n, dtype, cfg, seed) -> dict:
    inputs = {k: v.cuda() for k, v in scan_inputs(b, l, e, n, 3, seed, dtype).items()}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    out = bidirectional_selective_scan(**leaves, cfg=cfg)
    ref = naive_bidirectional_scan(*(ref_leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")))
    dout = torch.randn_like(ref)
    out.backward(dout.to(out.dtype))
    ref.backward(dout)
    return {"out": rel(out, ref), **{f"d{k}": rel(leaves[k].grad, ref_leaves[k].grad) for k in leaves}}


def mamba_views(inp: dict):
    """mamba-ssm's (b, d, l) layout per direction, direction 1 flipped, as separate leaf tensors."""
    per_dir = []
    for d in range(2):
        flip = (lambda t: t.flip(1)) if d else (lambda t: t)
        per_dir.append(dict(u=flip(inp["u"][d]).transpose(1, 2), delta=flip(inp["delta"][d]).transpose(1, 2),
                            A=inp["A"][d], B=flip(inp["B"][d]).transpose(1, 2), C=flip(inp["C"][d]).transpose(1, 2),
                            D=inp["D"][d], z=flip(inp["z"]).transpose(1, 2), delta_bias=inp["delta_bias"][d]))
    return [{k: v.detach().contiguous().requires_grad_() for k, v in p.items()} for p in per_dir]


def mamba_bidirectional(ssf, per_dir):
    outs = [ssf(p["u"], p["delta"], p["A"].float(), p["B"], p["C"], p["D"].float(), p["z"], p["delta_bias"].float(),
                delta_softplus=True) for p in per_dir]
    return outs[0].transpose(1, 2) + outs[1].flip(2).transpose(1, 2)


def check_vs_mamba(ssf, b, l, e, n, dtype, cfg, seed) -> dict:
    inputs = {k: v.cuda() for k, v in scan_inputs(b, l, e, n, 3, seed, dtype).items()}
    inputs = {k: (v.float() if k in ("A", "D", "delta_bias") else v) for k, v in inputs.items()}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = bidirectional_selective_scan(**leaves, cfg=cfg)
    per_dir = mamba_views(inputs)
    ref = mamba_bidirectional(ssf, per_dir)
    dout = torch.randn_like(ref)
    out.backward(dout)
    ref.backward(dout)
    errors = {"out": rel(out, ref)}
    back = lambda name, d: per_dir[d][name].grad.transpose(1, 2).flip(1) if d else per_dir[d][name].grad.transpose(1, 2)  # noqa: E731,E501
    for name in ("u", "delta", "B", "C"):
        errors[f"d{name}"] = rel(leaves[name].grad, torch.stack([back(name, 0), back(name, 1)]))
    errors["dz"] = rel(leaves["z"].grad, back("z", 0) + back("z", 1))
    for name in ("A", "D", "delta_bias"):
        errors[f"d{name}"] = rel(leaves[name].grad, torch.stack([per_dir[0][name].grad, per_dir[1][name].grad]))
    return errors


def check_mixer(b, l, d_model, n, dtype, seed) -> dict:
    torch.manual_seed(seed)
    mixer = TinyBiMixer(d_model, n).cuda()
    ref_mixer = TinyBiMixer(d_model, n).cuda().double()
    ref_mixer.load_state_dict(mixer.state_dict())
    h = torch.randn(b, l, d_model, device="cuda", requires_grad=True)
    h_ref = h.detach().double().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = bimamba_forward(mixer, h)
    ref = ref_mixer(h_ref)
    dout = torch.randn_like(ref)
    out.float().backward(dout.float())
    ref.backward(dout)
    errors = {"out": rel(out, ref), "dh": rel(h.grad, h_ref.grad)}
    ref_params = dict(ref_mixer.named_parameters())
    errors.update({f"d{k}": rel(p.grad, ref_params[k].grad) for k, p in mixer.named_parameters()})
    return errors


# ------------------------------------------------------------------------------------------------ scan timing
def scan_floor_bytes(b, e, l, n, itemsize, backward: bool) -> int:
    """Forward: u, delta (2 directions), z read, out written, B, C read. Backward adds: u, delta, z, dout, B, C read;
    du, d(delta), dz, dB, dC written."""
    tokens = b * l
    fwd = tokens * (6 * e + 4 * n) * itemsize
    bwd = tokens * (11 * e + 8 * n) * itemsize
    return fwd + (bwd if backward else 0)


def scan_tensors(shape, dtype=torch.bfloat16) -> tuple:
    """(inputs, the same as autograd leaves, a random output gradient) of the scan at (B, E, L, N) on CUDA: dtype, with
    A, D and the delta bias in fp32 as the mixer passes them."""
    b, e, l, n = shape
    inputs = {k: v.cuda() for k, v in scan_inputs(b, l, e, n, 3, 0, dtype).items()}
    inputs = {k: (v.float() if k in ("A", "D", "delta_bias") else v) for k, v in inputs.items()}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    return inputs, leaves, torch.randn(b, l, e, device="cuda", dtype=dtype)


def time_scan(ssf, shape, dtype=torch.bfloat16) -> list:
    b, e, l, n = shape
    inputs, leaves, dout = scan_tensors(shape, dtype)
    rows = []
    floor_f = scan_floor_bytes(b, e, l, n, dtype.itemsize, False) / BANDWIDTH * 1e3
    floor_fb = scan_floor_bytes(b, e, l, n, dtype.itemsize, True) / BANDWIDTH * 1e3
    for cfg in CONFIGS:
        name = (f"triton T{cfg.block_t} E{cfg.block_e} w{cfg.num_warps} keep{int(cfg.keep_decay)} "
                f"pf{int(cfg.prefetch)} p{cfg.target_programs} r{cfg.backward_pass_registers} s{cfg.saved_states}")
        try:
            with torch.no_grad():
                fwd = bench_ms(lambda: bidirectional_selective_scan(**leaves, cfg=cfg))
            fb = bench_ms(lambda: bidirectional_selective_scan(**leaves, cfg=cfg).backward(dout),
                          grads=list(leaves.values()))
            fb_graph = graphed_ms(lambda: bidirectional_selective_scan(**leaves, cfg=cfg).backward(dout),
                                  list(leaves.values()))
        except Exception as exc:  # a tile that does not fit: report and go on
            print(f"{name} at {shape}: {exc!r}"[:400])
            continue
        rows.append(dict(shape=shape, impl=name, cfg=cfg, fwd_ms=fwd, fwdbwd_ms=fb, fwdbwd_graphed_ms=fb_graph,
                         floor_fwd_ms=floor_f, floor_fwdbwd_ms=floor_fb))
    if ssf is not None:
        per_dir = mamba_views(inputs)
        leaves_m = [t for p in per_dir for t in p.values()]
        dout_m = dout.clone()
        with torch.no_grad():
            fwd = bench_ms(lambda: mamba_bidirectional(ssf, per_dir))
        fb = bench_ms(lambda: mamba_bidirectional(ssf, per_dir).backward(dout_m), grads=leaves_m)
        fb_graph = graphed_ms(lambda: mamba_bidirectional(ssf, per_dir).backward(dout_m), leaves_m)
        rows.append(dict(shape=shape, impl="mamba-ssm x2 (pre-flipped)", fwd_ms=fwd, fwdbwd_ms=fb,
                         fwdbwd_graphed_ms=fb_graph, floor_fwd_ms=floor_f, floor_fwdbwd_ms=floor_fb))
    return rows


# ------------------------------------------------------------------------------------------------ block stacks
class MambaMixer(nn.Module):
    """The official bimamba v2 parameters with the official initialisation (S4D-real A, dt bias in [1e-3, 0.1])."""

    def __init__(self, d_model=192, d_state=16):
        super().__init__()
        e, self.r, self.n = 2 * d_model, math.ceil(d_model / 16), d_state
        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        for s in ("", "_b"):
            setattr(self, "conv1d" + s, nn.Conv1d(e, e, 4, groups=e, padding=3))
            setattr(self, "x_proj" + s, nn.Linear(e, self.r + 2 * d_state, bias=False))
            dt_proj = nn.Linear(self.r, e)
            dt = torch.exp(torch.rand(e) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            setattr(self, "dt_proj" + s, dt_proj)
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(e, 1)
        self.A_log, self.A_b_log = nn.Parameter(a_log.clone()), nn.Parameter(a_log.clone())
        self.D, self.D_b = nn.Parameter(torch.ones(e)), nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, d_model, bias=False)
        self.plain = None  # set to mamba-ssm's selective_scan_fn to run the plain construction
        self.cfg = STACK_CONFIG[0]

    def forward(self, h):
        if self.plain is None:
            return bimamba_forward(self, h, self.cfg)
        return plain_bimamba(self, h, self.plain)


def plain_bimamba(m, h, ssf):
    """The plain construction on mamba-ssm: conv1d, projections and one selective_scan_fn per direction on flipped
    copies (what the issue's 97 ms anchor measured)."""
    length = h.shape[1]
    xz = m.in_proj(h).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    total = 0
    for s, flip in (("", False), ("_b", True)):
        xd, zd = (x.flip(-1), z.flip(-1)) if flip else (x, z)
        u = F.silu(getattr(m, "conv1d" + s)(xd)[..., :length])
        x_dbl = getattr(m, "x_proj" + s)(u.transpose(1, 2))
        dt_proj = getattr(m, "dt_proj" + s)
        dt = (x_dbl[..., :m.r] @ dt_proj.weight.T).transpose(1, 2)
        bm = x_dbl[..., m.r:m.r + m.n].transpose(1, 2).contiguous()
        cm = x_dbl[..., m.r + m.n:].transpose(1, 2).contiguous()
        A = -torch.exp(getattr(m, "A_log" if s == "" else "A_b_log").float())
        y = ssf(u, dt, A, bm, cm, getattr(m, "D" + s).float(), zd, dt_proj.bias.float(), delta_softplus=True)
        total = total + (y.flip(-1) if flip else y)
    return m.out_proj(total.transpose(1, 2))


class MambaBlock(nn.Module):
    def __init__(self, dim=192):
        super().__init__()
        self.norm, self.mixer = nn.RMSNorm(dim, eps=1e-5), MambaMixer(dim)

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class AttentionBlock(nn.Module):
    def __init__(self, dim=192, heads=3):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, l, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, l, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def graphed_ms(step, params) -> float:
    """Median time of `step` replayed as one CUDA graph (launch overhead out of the picture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            for p in params:
                p.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return bench_ms(graph.replay)


def time_stack(make_block, frames: int, depth=24, dim=192) -> dict:
    clips = max(1, 64 // frames)
    model = nn.Sequential(*[make_block() for _ in range(depth)]).cuda()
    x = torch.randn(clips, frames * 196 + 1, dim, device="cuda", requires_grad=True)
    params = [x, *model.parameters()]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = bench_ms(step, grads=params)
    peak = torch.cuda.max_memory_allocated() / 2**30
    try:
        ms_graph = graphed_ms(step, params)
    except Exception as exc:  # capture failed: report eager only
        print(f"graph capture failed: {exc!r}"[:300])
        ms_graph = float("nan")
    del model, x, params
    torch.cuda.empty_cache()
    best = min(ms, ms_graph) if ms_graph == ms_graph else ms
    return dict(frames=frames, clips=clips, ms_per_clip=ms / clips, graphed_ms_per_clip=ms_graph / clips,
                clips_per_s=1e3 * clips / best, peak_gib=peak)


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--mamba-only", action="store_true", help="only the mamba-ssm checks and timings")
    parser.add_argument("--skip-checks", action="store_true", help="no correctness checks before the sweep")
    parser.add_argument("--tiles", nargs="+", metavar="T/KEEP/PROGRAMS[/STATES]", default=None,
                        help="sweep these tiles instead of the built-in list, e.g. 1/1/2048 (block_t, keep_decay, "
                             "target_programs; 32 channels a warp; STATES: saved_states, input or float32)")
    parser.add_argument("--no-stacks", action="store_true", help="skip the block-stack timings")
    parser.add_argument("--quick", action="store_true", help="the default tiles only, no block stacks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/fused.py times the fused scan on a CUDA GPU; none here: skipped")
        return 0
    if args.quick:
        CONFIGS[:] = [ScanConfig()]
        args.no_stacks = True
    if args.tiles:
        CONFIGS[:] = [ScanConfig(block_t=int(t), keep_decay=bool(int(k)), target_programs=int(p),
                                 saved_states=(rest or ["input"])[0])
                      for t, k, p, *rest in (tile.split("/") for tile in args.tiles)]
    torch.backends.cuda.matmul.allow_tf32 = False
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    ssf = mamba_scan_fn()
    results = {"correctness": {}, "scan": [], "stack": []}
    t0 = time.time()
    checks = {
        "naive fp32 (1,301,48,16) 3 segments": lambda: check_vs_naive(1, 301, 48, 16, torch.float32,
                                                                      ScanConfig(segments=3), 1),
        "naive bf16 (2,130,64,16)": lambda: check_vs_naive(2, 130, 64, 16, torch.bfloat16, ScanConfig(), 2),
        "mixer bf16 (2,97,d32,16)": lambda: check_mixer(2, 97, 32, 16, torch.bfloat16, 4),
    }
    if ssf is not None:
        checks["mamba fp32 (2,1001,128,16)"] = lambda: check_vs_mamba(ssf, 2, 1001, 128, 16, torch.float32,
                                                                      ScanConfig(), 5)
        checks["mamba bf16 (2,1001,128,16)"] = lambda: check_vs_mamba(ssf, 2, 1001, 128, 16, torch.bfloat16,
                                                                      ScanConfig(), 6)
    if args.mamba_only or args.skip_checks:
        checks = {k: v for k, v in checks.items() if k.startswith("mamba") and args.mamba_only}
    if args.mamba_only:
        CONFIGS.clear()
    for name, fn in checks.items():
        errors = fn()
        results["correctness"][name] = errors
        worst = max(errors, key=errors.get)
        print(f"[{time.time() - t0:5.0f}s] {name}: max rel err {errors[worst]:.2e} ({worst})", flush=True)
    for shape in SCAN_SHAPES:
        rows = time_scan(ssf, shape)
        results["scan"] += rows
        for r in rows:
            print(f"[{time.time() - t0:5.0f}s] scan {shape} {r['impl']}: fwd {r['fwd_ms']:.3f} ms, fwd+bwd "
                  f"{r['fwdbwd_ms']:.3f} ms, graphed {r['fwdbwd_graphed_ms']:.3f} ms (floor {r['floor_fwd_ms']:.3f} / "
                  f"{r['floor_fwdbwd_ms']:.3f})", flush=True)
    fastest = [r for r in results["scan"] if r["impl"].startswith("triton")]
    if fastest:
        best = min(fastest[-len(CONFIGS):], key=lambda r: r["fwdbwd_graphed_ms"])
        STACK_CONFIG[0] = best["cfg"]
        print(f"stack config: {best['impl']}")
        results["correctness"]["best config naive bf16"] = check_vs_naive(2, 130, 64, 16, torch.bfloat16, best["cfg"], 7)
        results["correctness"]["best config naive fp32 3 seg"] = check_vs_naive(1, 301, 48, 16, torch.float32,
                                                                         ScanConfig(**{**best["cfg"].__dict__, "segments": 3}), 8)
        print({k: max(v.values()) for k, v in results["correctness"].items()})
    stacks = {} if args.mamba_only else {"ViT-Ti SDPA": AttentionBlock, "BiMamba-Ti fused": MambaBlock}
    if ssf is not None:
        def plain_block():
            block = MambaBlock()
            block.mixer.plain = ssf
            return block
        stacks["BiMamba-Ti plain mamba-ssm"] = plain_block
    for frames in () if args.no_stacks else (8, 64):
        for name, make in stacks.items():
            r = dict(name=name, **time_stack(make, frames))
            results["stack"].append(r)
            print(f"[{time.time() - t0:5.0f}s] stack {name} {frames}f: {r['ms_per_clip']:.2f} ms/clip eager, "
                  f"{r['graphed_ms_per_clip']:.2f} graphed, "
                  f"{r['clips_per_s']:.1f} clips/s, peak {r['peak_gib']:.2f} GiB", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fused.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print("\n| scan shape | impl | fwd ms | fwd+bwd ms | fwd+bwd graphed ms | floor fwd / fwd+bwd ms | "
          "graphed / floor |")
    for r in results["scan"]:
        print(f"| {r['shape']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
              f"{r['fwdbwd_graphed_ms']:.3f} | {r['floor_fwd_ms']:.3f} / {r['floor_fwdbwd_ms']:.3f} | "
              f"{r['fwdbwd_graphed_ms'] / r['floor_fwdbwd_ms']:.1f}x |")
    print("\n| stack | frames | ms/clip eager | ms/clip graphed | clips/s (best) | peak GiB |")
    for r in results["stack"]:
        print(f"| {r['name']} | {r['frames']} | {r['ms_per_clip']:.2f} | {r['graphed_ms_per_clip']:.2f} | "
              f"{r['clips_per_s']:.1f} | {r['peak_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
