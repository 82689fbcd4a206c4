"""Kernel benchmark: the Triton path against dense bf16 grouped GEMM and the bandwidth roofline (issue 9).

Layers: Qwen3-30B-A3B-shaped (E=128, n=2048, m=768, top-8) and Mixtral-shaped (E=8, n=4096, m=14336, top-2), random
weights in each method's format (svd, moe-svd, mobe, rs-moe, rfid-moe) at ratios 0.3 and 0.5, tokens
M ∈ {1, 8, 32, 64, 256, 2048, 8192} with uniform random top-k routing. Per row:

* ``ours_us``: the op's automatic path (``lowrank_us`` and ``dense_tile_us``: each path forced);
* ``dense_us``: the dense bf16 MoE with torch's grouped GEMM (``torch._grouped_mm``: sort, gate/up GEMM, SiLU·mul,
  down GEMM, weighted scatter); ``dense_ours_us``: our kernels on an all-dense layer (the gather GEMM);
* ``roofline_us``: bytes the compressed layer must read for this routing (the active functions' factors, the shared
  tensors they use, x and the routing) ÷ the measured device copy bandwidth (bytes read + written per second of a
  large device-to-device copy); ``dense_roofline_us`` the same for the dense layer.

``--factor-dtype fp8_e4m3`` builds every compressed layer with FP8 factors and float32 per-row/per-rank scales
(format v2; the kernels read the FP8 bytes and dequantize in their loads); rows carry ``factor_dtype`` and are
compared with the same bf16 dense baseline, and ``--append`` keeps bf16 and FP8 rows side by side.

Times are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``), so launch overhead is what a
vLLM CUDA graph sees. Targets (printed): decode M ≤ 64 within 1.15× of the roofline and dense/ours ≥ 0.85/(1−ratio);
prefill M ≥ 2048 not slower than dense.

    python benchmarks/kernels.py                       # everything -> benchmarks/results/kernels.json (GPU)
    python benchmarks/kernels.py --layers qwen3 --ratios 0.5 --ms 1 64 --out /tmp/k.json
    python benchmarks/kernels.py --factor-dtype fp8_e4m3 --ms 1 8 64 512 --append   # FP8 rows, same file
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke --out /tmp/smoke.json   # CPU: does it still run?

Needs torch + Triton (no vLLM); from a checkout it imports ./kernels directly when the package is not installed.
``--smoke`` uses tiny shapes, the CPU (under the interpreter) and wall-clock timing; its numbers mean nothing and it
writes only where ``--out`` says.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import vllm_moe_lowrank.kernels  # noqa: F401  (installed: kernels/ is vllm_moe_lowrank.kernels)
except ImportError:  # a plain checkout: the same package from ./kernels
    import kernels as _kernels

    sys.modules["vllm_moe_lowrank.kernels"] = _kernels
    import vllm_moe_lowrank

    vllm_moe_lowrank.kernels = _kernels
import triton  # noqa: E402

from vllm_moe_lowrank.format import (FORMAT_VERSION, BaseTerm, DenseTerm, LayerSpec, LowRankTerm,  # noqa: E402
                                     MoELowRankConfig, ProjSpec, ResidualTerm, UnitSplit)
from vllm_moe_lowrank.kernels import LayerLayout, experts_forward  # noqa: E402
from vllm_moe_lowrank.kernels import triton_forward  # noqa: E402
from vllm_moe_lowrank.rounding import quantize_rows  # noqa: E402

LAYERS = {"qwen3": dict(name="Qwen3-30B-A3B", E=128, n=2048, m=768, K=8),
          "mixtral": dict(name="Mixtral-8x7B", E=8, n=4096, m=14336, K=2)}
SMOKE_LAYER = dict(name="smoke", E=8, n=64, m=32, K=2)
METHODS = ("svd", "moe-svd", "mobe", "rs-moe", "rfid-moe")
MS = (1, 8, 32, 64, 256, 2048, 8192)
RATIOS = (0.3, 0.5)
OUT = ROOT / "benchmarks" / "results" / "kernels.json"


# ----- each method's format at a ratio (shapes as the converters write them; weights random) -------------------
def _clamp(r: float, hi: int) -> int:
    return int(max(16, min(hi, math.floor(r))))


def _ragged(total_rank: int, count: int, hi: int, spread: float = 0.2) -> list[int]:
    """count ranks around total_rank/count, alternating ±spread, same sum (clamped)."""
    base = total_rank / count
    return [_clamp(base * (1 + spread * (1 if i % 2 else -1)), hi) for i in range(count)]


def method_spec(method: str, E: int, n: int, m: int, ratio: float) -> LayerSpec:
    keep = 1 - ratio
    proj_budget = keep * E * n * m  # parameters per projection type at a uniform split
    if method == "svd":
        r = _clamp(keep * n * m / (n + m), min(n, m))
        return LayerSpec(method="svd", **{p: ProjSpec(lowrank=LowRankTerm(ranks=[r] * E)) for p in ("gate", "up",
                                                                                                     "down")})
    if method == "moe-svd":  # groups of 8 share R; k_u left slots per group (expert at frequency rank π uses
        gs = min(8, E)  # slot min(π, k_u − 1)); k_u grows from the paper's gs/4 until the rank fits
        G = E // gs
        groups = [e // gs for e in range(E)]
        projs = {}
        for p in ("gate", "up", "down"):
            out, inp = (n, m) if p == "down" else (m, n)
            ku = max(1, gs // 4)
            while ku < gs and proj_budget / (G * inp + G * ku * out) > min(out, inp):
                ku += 1
            r = _clamp(proj_budget / (G * inp + G * ku * out), min(out, inp))
            slots = [g * ku + min(e % gs, ku - 1) for e, g in enumerate(groups)]
            projs[p] = ProjSpec(lowrank=LowRankTerm(ranks=[r] * E, right_groups=groups, left_slots=slots))
        return LayerSpec(method="moe-svd", **projs)
    if method == "mobe":  # J = E/4 bases, silu; down dense while ratio <= 1/3, else a basis mix too
        J = max(1, round(E / 4))
        dense_down = ratio <= 1 / 3
        total = keep * 3 * E * n * m - (E * n * m if dense_down else 0)
        per = total / (2 if dense_down else 3)
        mk = lambda out, inp: LowRankTerm(ranks=[_clamp((per - E * J) / (E * out + J * inp), min(out, inp))] * E,  # noqa
                                          num_bases=J, act="silu")
        return LayerSpec(method="mobe", gate=ProjSpec(lowrank=mk(m, n)), up=ProjSpec(lowrank=mk(m, n)),
                         down=ProjSpec(dense=DenseTerm()) if dense_down else ProjSpec(lowrank=mk(n, m)))
    if method == "rs-moe":  # 10% of units pruned, 80% of the budget on exact units, base + low-rank delta
        budget = keep * 3 * E * n * m
        exact = min(int(0.8 * budget / (3 * n * E)), int(0.9 * m))
        low = m - exact - int(0.1 * m)
        rest = budget - 3 * n * E * exact - n * m
        r = _clamp(rest / (E * 3 * (low + n)), min(low, n))
        units = UnitSplit(exact=[exact] * E, lowrank=[low] * E)
        gu = lambda: ProjSpec(dense=DenseTerm(units="exact"), lowrank=LowRankTerm(units="lowrank", ranks=[r] * E))  # noqa
        return LayerSpec(method="rs-moe", units=units, gate=gu(), up=gu(),
                         down=ProjSpec(dense=DenseTerm(units="exact"),
                                       lowrank=LowRankTerm(units="lowrank", ranks=[r] * E), base=BaseTerm()))
    if method == "rfid-moe":  # groups of 4 share R (ragged group ranks) + per-expert L + residual s = 3% of n
        G, s = max(1, E // 4), max(1, round(0.03 * n))
        groups = [e * G // E for e in range(E)]
        dense_down = ratio <= 1 / 3
        total = keep * 3 * E * n * m - (E * n * m if dense_down else 0)
        per = total / (2 if dense_down else 3)
        granks = _ragged((per - E * m * s) / (G * n + E * m) * G, G, min(m, n))
        gu = lambda: ProjSpec(lowrank=LowRankTerm(ranks=[granks[g] for g in groups], right_groups=groups),  # noqa
                              residual=ResidualTerm(groups=groups, width=s))
        if dense_down:
            down = ProjSpec(dense=DenseTerm())
        else:
            r = _clamp(per / (G * n + E * m), min(n, m))
            down = ProjSpec(lowrank=LowRankTerm(ranks=[r] * E, left_slots=groups))
        return LayerSpec(method="rfid-moe", gate=gu(), up=gu(), down=down)
    if method == "dense":
        return LayerSpec(method="dense", **{p: ProjSpec(dense=DenseTerm()) for p in ("gate", "up", "down")})
    raise ValueError(method)


FACTOR_DTYPES = ("bfloat16", "fp8_e4m3")


def make_cfg(spec: LayerSpec, E: int, n: int, m: int, factor_dtype: str | None = None) -> MoELowRankConfig:
    """``factor_dtype`` "fp8_e4m3": FP8 factors with scales; None / "bfloat16": factors in the activation dtype."""
    fp8 = factor_dtype == "fp8_e4m3" and spec.method != "dense"
    return MoELowRankConfig(format_version=FORMAT_VERSION, method=spec.method, num_experts=E, hidden_size=n,
                            intermediate_size=m, moe_prefix="model.layers.{layer}.mlp.experts", moe_layers=[0],
                            layers={0: spec}, factor_dtype="fp8_e4m3" if fp8 else None)


def achieved_ratio(cfg: MoELowRankConfig) -> float:
    kept = sum(math.prod(ts.shape) for ts in cfg.tensor_specs(0).values() if ts.is_param)
    return 1 - kept / (3 * cfg.num_experts * cfg.hidden_size * cfg.intermediate_size)


def random_layer(cfg: MoELowRankConfig, dtype, dev, seed: int = 0, key: str = ""):
    """Layout + finalized buffers filled with random factors directly on the device (indices valid)."""
    layout = LayerLayout(cfg, 0, key=key)
    bufs = layout.new_buffers(dtype, dev)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for name, (numel, kind) in layout.buffers.items():
        if kind == "float":
            bufs[name].normal_(0, 1)
    for name, b in layout.blocks.items():  # scale each float block by 1/sqrt(fan-in); indices and mixes exact
        ts = b.spec
        if ts.scale is not None:  # FP8: random block rounded with the format's scales, as the converter does
            w = torch.randn(ts.shape, device=dev) * ts.shape[-1] ** -0.5
            q, sc = quantize_rows(w, ts.scale_axis)
            layout.store(bufs, name, q)
            layout.store(bufs, ts.scale, sc.to(dev))
        elif ts.scale_of is not None:
            continue
        elif ts.suffix == "res_bucket":
            width = cfg.layers[0].proj(ts.proj).residual.width
            layout.store(bufs, name, torch.randint(0, width, ts.shape, generator=g, dtype=torch.int32))
        elif ts.suffix == "base_idx":
            layout.store(bufs, name, torch.randperm(cfg.intermediate_size, generator=g)[:ts.shape[0]].int())
        elif ts.suffix == "lr_mix":
            layout.store(bufs, name, torch.softmax(torch.randn(ts.shape, generator=g), 0))
        elif b.numel:
            layout.view(bufs, name).mul_(ts.shape[-1] ** -0.5)
    bufs.update(layout.finalize(bufs))
    return layout, bufs


# ----- dense baseline ------------------------------------------------------------------------------------------
def dense_weights(E, n, m, dtype, dev):
    w13 = torch.randn(E, 2 * m, n, dtype=dtype, device=dev) * n ** -0.5  # [E, out, in]
    w2 = torch.randn(E, n, m, dtype=dtype, device=dev) * m ** -0.5
    return w13, w2


def dense_grouped_mm(x, w, ids, w13, w2):
    """Dense MoE with torch's grouped GEMM (no host sync: capturable)."""
    T, K = ids.shape
    E, m = w13.shape[0], w2.shape[2]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat,
                                                                                                    dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // K
    xs = x[tok]
    gu = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)  # [P, 2m]
    h = torch.nn.functional.silu(gu[:, :m]) * gu[:, m:]
    y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)  # [P, n]
    y = y.float() * w.reshape(-1)[order, None]
    return torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tok, y).to(x.dtype)


def grouped_mm_works(dev) -> bool:
    if dev.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(32, 64, dtype=torch.bfloat16, device=dev)
        ids = torch.randint(0, 4, (16, 2), device=dev, dtype=torch.int32)
        w13, w2 = dense_weights(4, 64, 32, torch.bfloat16, dev)
        dense_grouped_mm(x[:16], torch.rand(16, 2, device=dev), ids, w13, w2)
        torch.cuda.synchronize()
        return True
    except Exception as err:  # noqa: BLE001
        print(f"torch._grouped_mm unavailable ({type(err).__name__}: {err}); dense baseline = our dense kernels")
        return False


# ----- bytes, bandwidth, timing --------------------------------------------------------------------------------
def compressed_bytes(layout: LayerLayout, plan, ids: torch.Tensor, x: torch.Tensor) -> int:
    """Bytes the compressed layer must read for this routing: active functions' own tensors, the parts of the
    shared tensors they use (all of it where the kernel reads all), x and the routing."""
    spec = layout.spec
    fids = sorted(set(plan.func_of_expert[ids.reshape(-1).long()].tolist()) - {-1})
    reps = {layout.functions[f][0] for f in fids}
    elt = x.element_size()
    total = x.numel() * elt + ids.numel() * (ids.element_size() + 4)
    for name, b in layout.blocks.items():
        ts = b.spec
        felt = {"float": elt, "fp8": 1}.get(ts.dtype, 4)
        size = b.numel * felt
        if ts.expert is not None:
            total += size if ts.expert in reps else 0
            continue
        ps = spec.proj(ts.proj)
        lr, res = ps.lowrank, ps.residual
        if ts.suffix == "lr_v" and lr.right_groups is not None and plan.proj[ts.proj].lowrank.mode == "pair":
            gr = lr.group_ranks()
            total += sum(gr[g] for g in {lr.right_groups[e] for e in reps}) * b.shape[1] * felt
        elif ts.suffix == "lr_u" and lr.left_slots is not None:
            sr = lr.slot_ranks()
            total += sum(sr[s] for s in {lr.left_slots[e] for e in reps}) * b.shape[0] * felt
        elif ts.suffix == "res_bucket":
            total += len({res.groups[e] for e in reps}) * b.shape[1] * 4
        else:  # bases, a token-mode group factor, the down base: read whole
            total += size
    return total


def dense_bytes(ids, x, E, n, m) -> int:
    active = len(set(ids.reshape(-1).tolist()))
    return active * 3 * n * m * x.element_size() + x.numel() * x.element_size() + ids.numel() * 8


def copy_bandwidth(dev) -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    if dev.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def bench(fn, dev, smoke: bool) -> tuple[float, str, torch.Tensor]:
    """(median microseconds of fn, timing mode, fn's output); one eager warm-up call first (smoke: that one call,
    wall-clock)."""
    t = time.perf_counter()
    out = fn()
    if smoke:
        return (time.perf_counter() - t) * 1e6, "wall-clock (smoke)", out
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3, "cuda-graph", out
    except Exception as err:  # noqa: BLE001
        print(f"  (CUDA-graph timing failed: {type(err).__name__}: {err}; timing eagerly)")
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3, "eager", out


def routing(T, K, E, n, dtype, dev, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=g).to(dtype).to(dev)
    ids = torch.argsort(torch.rand(T, E, generator=g), 1)[:, :K].int().to(dev)
    w = torch.softmax(torch.randn(T, K, generator=g), 1).to(dev)
    return x, w, ids


# ----- main ---------------------------------------------------------------------------------------------------
def run(args) -> dict:
    dev = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        torch.set_num_threads(1)  # tiny CPU ops: extra threads only add hand-off cost
    dtype = torch.float32 if args.smoke else torch.bfloat16
    layers = {"smoke": SMOKE_LAYER} if args.smoke else {k: LAYERS[k] for k in args.layers}
    ms = args.ms or ((5,) if args.smoke else MS)
    ratios = args.ratios or ((0.5,) if args.smoke else RATIOS)
    bw = copy_bandwidth(dev)
    use_gmm = grouped_mm_works(dev)
    config = dict(bk=32, br=16, bn_units=32, bn_hidden=32, token_bn=32) if args.smoke else None
    rows = []
    for lkey, L in layers.items():
        E, n, m, K = L["E"], L["n"], L["m"], L["K"]
        print(f"== {L['name']}: E={E} n={n} m={m} top-{K}")
        dense_cfg = make_cfg(method_spec("dense", E, n, m, 0.0), E, n, m)
        d_layout, d_bufs = random_layer(dense_cfg, dtype, dev, key=f"bench.{lkey}.dense")
        w13, w2 = dense_weights(E, n, m, dtype, dev) if use_gmm else (None, None)
        dense_times = {}
        for M in ms:
            x, w, ids = routing(M, K, E, n, dtype, dev, seed=M)
            ours_dense, _, _ = bench(lambda: triton_forward.experts_forward_triton(d_layout, d_bufs, x, w, ids,
                                                                                config=config), dev, args.smoke)
            if use_gmm:
                gmm, _, _ = bench(lambda: dense_grouped_mm(x, w, ids, w13, w2), dev, args.smoke)
            elif args.smoke:
                gmm, _, _ = bench(lambda: experts_forward(d_layout, d_bufs, x, w, ids), dev, args.smoke)
            else:
                gmm = ours_dense
            dense_times[M] = (gmm, ours_dense, dense_bytes(ids, x, E, n, m))
        for method in args.methods:
            for ratio in ratios:
                cfg = make_cfg(method_spec(method, E, n, m, ratio), E, n, m, args.factor_dtype)
                layout, bufs = random_layer(cfg, dtype, dev, key=f"bench.{lkey}.{method}.{ratio}")
                fbytes = sum(t.numel() * t.element_size() for t in bufs.values())  # on the device, all tensors
                ach = achieved_ratio(cfg)
                for M in ms:
                    x, w, ids = routing(M, K, E, n, dtype, dev, seed=M)
                    plan = triton_forward.get_plan(layout, bufs, K, dev)
                    auto = triton_forward.choose_path(M, K, plan.F)
                    t, got = {}, {}
                    for path in ("lowrank", "dense_tile"):
                        t[path], mode, got[path] = bench(lambda: triton_forward.experts_forward_triton(
                            layout, bufs, x, w, ids, path=path, config=config), dev, args.smoke)
                    err = None
                    if M == min(64, max(ms)) or args.smoke:  # both paths against the torch path
                        ref = experts_forward(layout, bufs, x, w, ids).float()
                        err = max(float((g.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
                                  for g in got.values())
                    gmm, ours_dense, dbytes = dense_times[M]
                    cbytes = compressed_bytes(layout, plan, ids, x)
                    ours = t[auto]
                    row = dict(layer=L["name"], method=method, ratio=ratio, achieved_ratio=round(ach, 4), M=M,
                               factor_dtype=args.factor_dtype, layer_bytes=fbytes,
                               dense_layer_bytes=3 * E * n * m * x.element_size(), path=auto, ours_us=ours, lowrank_us=t["lowrank"], dense_tile_us=t["dense_tile"],
                               dense_us=gmm, dense_ours_us=ours_dense, bytes_read=cbytes, dense_bytes_read=dbytes,
                               roofline_us=None if args.smoke else cbytes / bw * 1e6,
                               dense_roofline_us=None if args.smoke else dbytes / bw * 1e6,
                               timing=mode, max_rel_err_vs_torch=err)
                    if not args.smoke:
                        row["ours_over_roofline"] = ours / row["roofline_us"]
                        row["dense_over_ours"] = gmm / ours
                        row["needed_dense_over_ours"] = 0.85 / (1 - ach) if M <= 64 else 1.0
                        row["target_met"] = (row["ours_over_roofline"] <= 1.15 and
                                             row["dense_over_ours"] >= row["needed_dense_over_ours"]) if M <= 64 \
                            else (ours <= gmm if M >= 2048 else None)
                    rows.append(row)
                    print(_fmt(row))
            if args.out and not args.smoke:  # a time-capped run keeps what it measured
                args.out.write_text(json.dumps(dict(args.old, partial=True, rows=merge(args.old, rows)), indent=1)
                                    + "\n")
    return dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
                smoke=bool(args.smoke), torch=torch.__version__, triton=triton.__version__,
                copy_bandwidth_GBps=None if math.isnan(bw) else bw / 1e9,
                dense_baseline="torch._grouped_mm" if use_gmm else "the torch path on an all-dense layer" if args.smoke
                else "our Triton kernels on an all-dense layer",
                dense_tile_min_rows=triton_forward.DENSE_TILE_MIN_ROWS,
                note="smoke run: timings are meaningless" if args.smoke else
                "medians of CUDA-graph replays; roofline = bytes read / measured copy bandwidth",
                rows=rows)


def _fmt(r: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:9.1f}"  # noqa: E731
    fd = " fp8" if r.get("factor_dtype") == "fp8_e4m3" else ""
    s = (f"{r['layer'][:13]:13} {r['method'] + fd:12} {r['ratio']:.1f} M={r['M']:<5} {r['path']:10}"
         f" ours {f(r['ours_us'])}"
         f"  lowrank {f(r['lowrank_us'])}  dtile {f(r['dense_tile_us'])}  dense {f(r['dense_us'])}"
         f"  roof {f(r['roofline_us'])}")
    if "ours_over_roofline" in r:
        s += (f"  ours/roof {r['ours_over_roofline']:5.2f}  dense/ours {r['dense_over_ours']:5.2f}"
              f" (need {r['needed_dense_over_ours']:.2f})  {'' if r['target_met'] is None else 'OK' if r['target_met'] else 'MISS'}")
    return s


def merge(old: dict, rows: list[dict]) -> list[dict]:
    """``old``'s rows (an earlier run's file, ``--append``) that ``rows`` do not replace, then ``rows``."""
    key = lambda r: (r["layer"], r["method"], r["ratio"], r["M"], r.get("factor_dtype", "bfloat16"))  # noqa: E731
    new = {key(r) for r in rows}
    return [r for r in old.get("rows", []) if key(r) not in new] + rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", nargs="+", choices=sorted(LAYERS), default=sorted(LAYERS))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--ratios", nargs="+", type=float)
    ap.add_argument("--ms", nargs="+", type=int)
    ap.add_argument("--out", type=Path, help=f"results JSON (default {OUT.relative_to(ROOT)}; --smoke: none)")
    ap.add_argument("--factor-dtype", choices=FACTOR_DTYPES, default="bfloat16",
                    help="the compressed layers' factors: bfloat16 = the activations' dtype (float32 with --smoke); "
                         "fp8_e4m3 = FP8 data + float32 scales")
    ap.add_argument("--append", action="store_true", help="merge rows into an existing --out file")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (set TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    random.seed(0)
    out = args.out or (None if args.smoke else OUT)
    args.out = out
    args.old = json.loads(out.read_text()) if args.append and out is not None and out.exists() else {}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    res = run(args)
    if out is None:
        return
    res["rows"] = merge(args.old, res["rows"])
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
