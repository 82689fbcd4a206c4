"""The CPU path of ``moe_lowrank::experts`` (kernels/cpu_native.py, kernels/cpu_forward.py) against the torch path.

``torch_ref`` is the oracle (itself checked against materialized experts in test_kernels.py). Every term kind of
tests/specs.py, ragged ranks, TP and EP splits (one layout per rank), float32 and bfloat16; the native grouped GEMM
where the layer allows it (svd, rs-moe), the lean torch loop elsewhere. No vLLM needed.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import E, make_cfg, random_tensors, rank_layouts, routing

from specs import CASES
from vllm_moe_lowrank.kernels import LayerLayout, experts_forward, moe_lowrank_experts, register_layout
from vllm_moe_lowrank.kernels import cpu_forward, cpu_native

NATIVE = {"svd", "rs_moe"}  # cases whose every term the native GEMMs cover


def layouts(case: str, tp: int, ep: int, dtype, seed: int = 0):
    cfg = make_cfg(case, seed=seed)
    yield from rank_layouts(cfg, random_tensors(cfg, seed=seed), tp, ep, dtype)


def inputs(dtype, tokens: int | None = None, seed: int = 1):
    x, w, ids = routing(seed)
    if tokens is not None:  # more tokens per expert: the native kernel's multi-token blocks and ragged tails
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(tokens, x.shape[1], generator=g, dtype=torch.float64)
        ids = torch.stack([torch.randperm(E, generator=g)[:ids.shape[1]] for _ in range(tokens)]).int()
        w = torch.softmax(torch.randn(tokens, ids.shape[1], generator=g), 1)
    return x.to(dtype), w, ids


def check(got: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    if dtype == torch.bfloat16:  # different rounding points (bf16 GEMM outputs), same math
        assert (got.double() - ref.double()).abs().max() < 0.03 * ref.double().abs().max()
    else:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (1, 2)])
def test_cpu_path_matches_torch_ref(case, dtype, tp, ep):
    x, w, ids = inputs(dtype, tokens=37 if tp == ep == 1 else None)
    for layout, bufs in layouts(case, tp, ep, dtype):
        ref = experts_forward(layout, bufs, x, w, ids)
        check(cpu_forward.experts_forward_cpu(layout, bufs, x, w, ids), ref, dtype)
        assert cpu_native.supports(layout, bufs, dtype) == (case in NATIVE)
        if case in NATIVE:
            assert cpu_native.available(), "the native CPU kernel did not build (g++ and ninja are needed)"
            check(cpu_native.experts_forward_native(layout, bufs, x, w, ids), ref, dtype)


def test_native_single_token_and_unrouted_experts():
    """Decode shape: one token, most functions inactive (empty task rows), and EP ranks with no routed expert."""
    x, w, ids = inputs(torch.float32)
    x, w, ids = x[:1], w[:1], ids[:1]
    for case in sorted(NATIVE):
        for layout, bufs in layouts(case, 1, 3, torch.float32, seed=2):
            ref = experts_forward(layout, bufs, x, w, ids)
            check(cpu_native.experts_forward_native(layout, bufs, x, w, ids), ref, torch.float32)


def test_op_dispatches_to_cpu_path(monkeypatch):
    """The registered CPU kernel is the fast path; MOE_LOWRANK_KERNEL=torch selects the oracle exactly."""
    (layout, bufs), = layouts("rs_moe", 1, 1, torch.float32, seed=3)
    layout.key = "test.cpu_dispatch"
    register_layout(layout)
    tlist = [bufs[n] for n in layout.tensor_names]
    x, w, ids = inputs(torch.float32, tokens=11, seed=5)
    ref = experts_forward(layout, bufs, x, w, ids)
    fast = cpu_native.experts_forward_cpu(layout, bufs, x, w, ids)  # deterministic: one thread per function
    got = moe_lowrank_experts(x, w, ids, layout, tlist)
    check(got, ref, torch.float32)
    assert torch.equal(got, fast), "the CPU op did not take the CPU path"
    monkeypatch.setenv("MOE_LOWRANK_KERNEL", "torch")
    assert torch.equal(moe_lowrank_experts(x, w, ids, layout, tlist), ref)


def test_plan_follows_new_buffers():
    """The cached per-layer plan (factor views, task tables) is rebuilt when the layer's buffers change."""
    (layout, bufs), = layouts("svd", 1, 1, torch.float32)
    x, w, ids = inputs(torch.float32)
    first = cpu_native.experts_forward_cpu(layout, bufs, x, w, ids)
    bufs2 = {k: v.clone() for k, v in bufs.items()}
    for k, v in bufs2.items():
        if k == "w2_lr_u":  # down left factors: y doubles
            v.mul_(2)
    second = cpu_native.experts_forward_cpu(layout, bufs2, x, w, ids)
    torch.testing.assert_close(second, 2 * first, rtol=1e-4, atol=1e-5)
    check(second, experts_forward(layout, bufs2, x, w, ids), torch.float32)
