"""The torch compute path against materialize.materialize_projection, for every term kind, under TP and EP splits.

Random small layers (float64, so agreement is to rounding); TP and EP are simulated by building one layout per
rank and summing the ranks' un-reduced outputs, exactly as vLLM's all-reduce does. No vLLM needed.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from specs import CASES
from vllm_moe_lowrank.format import FORMAT_VERSION, MoELowRankConfig
from vllm_moe_lowrank.kernels import LayerLayout, experts_forward, moe_lowrank_experts, register_layout
from vllm_moe_lowrank.materialize import materialize_projection

E, N, M, T, K = 6, 10, 12, 9, 3


def make_cfg(case: str, seed: int = 0, E: int = E, n: int = N, m: int = M) -> MoELowRankConfig:
    spec = CASES[case](E, m, random.Random(seed))
    return MoELowRankConfig(format_version=FORMAT_VERSION, method=spec.method, num_experts=E, hidden_size=n,
                            intermediate_size=m, moe_prefix="model.layers.{layer}.mlp.experts", moe_layers=[0, 1],
                            layers={1: spec})


def random_tensors(cfg: MoELowRankConfig, layer: int = 1, seed: int = 0,
                   device: str | None = None) -> dict[str, torch.Tensor]:
    """Random tensors of a layer (valid indices); float ones float64 on the CPU, or float32 drawn on ``device``."""
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed) if device else None
    out = {}
    for name, ts in cfg.tensor_specs(layer).items():
        if ts.suffix == "res_bucket":
            width = cfg.layers[layer].proj(ts.proj).residual.width
            out[name] = torch.randint(0, width, ts.shape, generator=g, dtype=torch.int32)
        elif ts.suffix == "base_idx":
            out[name] = torch.randperm(cfg.intermediate_size, generator=g)[:ts.shape[0]].int()
        elif ts.suffix == "lr_mix":
            out[name] = torch.softmax(torch.randn(ts.shape, generator=g), 0)
        elif device:
            out[name] = torch.randn(ts.shape, generator=gd, device=device) / ts.shape[-1] ** 0.5
        else:
            out[name] = torch.randn(ts.shape, generator=g, dtype=torch.float64) / ts.shape[-1] ** 0.5
    return out


def reference(cfg, tensors, x, w, ids, layer: int = 1) -> torch.Tensor:
    """Σ_k w · expert(x) with each expert materialized densely (float64)."""
    get = tensors.__getitem__
    y = torch.zeros(x.shape[0], cfg.hidden_size, dtype=torch.float64)
    for e in ids.unique().tolist():
        W = {p: materialize_projection(cfg, layer, p, e, get) for p in ("gate", "up", "down")}
        hit = ids == e  # [T, K]
        rows = hit.any(1).nonzero().squeeze(1)
        h = F.silu(x[rows] @ W["gate"].T) * (x[rows] @ W["up"].T)
        y[rows] += (w * hit)[rows].sum(1, keepdim=True).double() * (h @ W["down"].T)
    return y


def rank_layouts(cfg, tensors, tp: int = 1, ep: int = 1, dtype=torch.float64):
    """(layout, loaded buffers) of each simulated TP × EP rank."""
    for rank in range(tp * ep):
        lo, hi = (rank * E // ep, (rank + 1) * E // ep) if ep > 1 else (0, E)
        layout = LayerLayout(cfg, 1, tp_rank=rank % tp, tp_size=tp, local_experts=list(range(lo, hi)))
        bufs = layout.new_buffers(dtype)
        for name in layout.blocks:
            layout.store(bufs, name, tensors[name])
        bufs.update(layout.finalize(bufs))
        yield layout, bufs


def run_ranks(cfg, tensors, x, w, ids, tp: int = 1, ep: int = 1, dtype=torch.float64) -> torch.Tensor:
    """Sum over simulated ranks of the compressed path's outputs."""
    y = torch.zeros(x.shape[0], cfg.hidden_size, dtype=torch.float64)
    for layout, bufs in rank_layouts(cfg, tensors, tp, ep, dtype):
        y += experts_forward(layout, bufs, x.to(dtype), w, ids).double()
    return y


def routing(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()  # [T, K]
    w = torch.softmax(torch.randn(T, K, generator=g), 1)  # [T, K] float32 like vLLM's router
    return x, w, ids


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (3, 1), (1, 2), (1, 3)])
def test_matches_materialized(case, tp, ep):
    cfg = make_cfg(case)
    tensors = random_tensors(cfg)
    x, w, ids = routing()
    ref = reference(cfg, tensors, x, w, ids)
    got = run_ranks(cfg, tensors, x, w, ids, tp=tp, ep=ep)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_and_bfloat16(case):
    cfg = make_cfg(case, seed=3)
    tensors = random_tensors(cfg, seed=3)
    x, w, ids = routing(seed=4)
    ref = reference(cfg, tensors, x, w, ids)
    torch.testing.assert_close(run_ranks(cfg, tensors, x, w, ids, dtype=torch.float32), ref, rtol=1e-4, atol=1e-5)
    scale = ref.abs().max()
    err = (run_ranks(cfg, tensors, x, w, ids, dtype=torch.bfloat16) - ref).abs().max()
    assert err < 0.05 * scale


def test_identical_experts_are_merged():
    """MoE-SVD: experts with the same (slot, group) everywhere are one function, computed once per token."""
    cfg = make_cfg("moe_svd")
    layout = LayerLayout(cfg, 1)
    assert len(layout.functions) == 4 and sorted(sum(layout.functions, [])) == list(range(E))
    assert len(LayerLayout(make_cfg("svd"), 1).functions) == E


def test_ragged_blocks_are_packed_without_padding():
    """Buffers hold exactly the checkpoint's elements (TP=1, all experts)."""
    for case in CASES:
        cfg = make_cfg(case)
        layout = LayerLayout(cfg, 1)
        stored = sum(numel for numel, _ in layout.buffers.values())
        assert stored == sum(torch.Size(ts.shape).numel() for ts in cfg.tensor_specs(1).values()), case


def test_tp_splits_units_exactly():
    """Every unit of every expert lands on exactly one TP rank."""
    cfg = make_cfg("rs_moe")
    spec = cfg.layers[1]
    for e in range(E):
        total = sum(LayerLayout(cfg, 1, tp_rank=k, tp_size=3).units[e].count for k in range(3))
        assert total == spec.units.exact[e] + spec.units.lowrank[e]


def test_custom_op_compiles():
    """The op is opaque to torch.compile (fullgraph) and gives the eager result."""
    cfg = make_cfg("mixed")
    tensors = random_tensors(cfg)
    layout = LayerLayout(cfg, 1, key="test.compile")
    bufs = layout.new_buffers(torch.float32)
    for name in layout.blocks:
        layout.store(bufs, name, tensors[name])
    bufs.update(layout.finalize(bufs))
    register_layout(layout)
    tlist = [bufs[n] for n in layout.tensor_names]
    x, w, ids = routing()
    x = x.float()

    def f(x, w, ids):
        return moe_lowrank_experts(x, w, ids, layout, tlist) * 2

    got = torch.compile(f, fullgraph=True, backend="eager")(x, w, ids)
    torch.testing.assert_close(got, 2 * experts_forward(layout, bufs, x, w, ids))


def test_shape_and_index_errors_name_the_tensor():
    cfg = make_cfg("rs_moe")
    tensors = random_tensors(cfg)
    layout = LayerLayout(cfg, 1)
    bufs = layout.new_buffers(torch.float32)
    name = cfg.tensor_name(1, "gate", "lr_u", 2)
    with pytest.raises(ValueError, match="lr_u.*has shape"):
        layout.store(bufs, name, tensors[name][:, :-1])
    name = cfg.tensor_name(1, "down", "base_idx", 0)
    bad = tensors[name].clone()
    if bad.numel():
        bad[0] = M
        with pytest.raises(ValueError, match="unit indices outside"):
            layout.store(bufs, name, bad)
