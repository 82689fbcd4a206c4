"""The CPU path of ``moe_lowrank::experts`` (kernels/cpu_native.py, kernels/cpu_forward.py) against the torch path.

``torch_ref`` is the oracle (itself checked against materialized experts in test_kernels.py). Every term kind of
tests/specs.py, ragged ranks, TP and EP splits (one layout per rank), float32 and bfloat16; the native call
(routing, grouped GEMMs and the RS-MoE base in C++) where the layer allows it (svd, rs-moe, a base over all units),
the lean torch loop elsewhere. No vLLM needed.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import E, make_cfg, random_tensors, rank_layouts, routing

from specs import CASES
from vllm_moe_lowrank.format import BaseTerm, LayerSpec, MoELowRankConfig, ProjSpec
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


def base_all_cfg(seed: int = 0) -> MoELowRankConfig:
    """svd's terms plus an RS-MoE base over all units (``units="all"``: the base reads h's first columns)."""
    cfg = make_cfg("svd", seed=seed)
    spec = cfg.layers[1]
    spec = LayerSpec(method="mixed", gate=spec.gate, up=spec.up,
                     down=ProjSpec(lowrank=spec.down.lowrank, base=BaseTerm(units="all")))
    return MoELowRankConfig(**{**cfg.model_dump(), "layers": {1: spec}})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_base_over_all_units(dtype):
    """The RS-MoE base inside the native call, with the other base map (all units; rs_moe covers "lowrank"),
    under TP (the base narrowed with the units) and EP."""
    cfg = base_all_cfg()
    tensors = random_tensors(cfg)
    x, w, ids = inputs(dtype, tokens=23)
    for tp, ep in ((1, 1), (2, 1), (1, 2)):
        for layout, bufs in rank_layouts(cfg, tensors, tp, ep, dtype):
            assert cpu_native.supports(layout, bufs, dtype)
            check(cpu_native.experts_forward_native(layout, bufs, x, w, ids),
                  experts_forward(layout, bufs, x, w, ids), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_wide_layer_blocks(dtype):
    """Shapes past the kernel's blocking: > 8 pairs per function (4-row x 4-token blocks), weight tasks split
    into L2 chunks (an exact-unit weight of 300 x 600), bf16 inner dimensions with masked tails, the base."""
    cfg = make_cfg("rs_moe", E=E, n=600, m=900)
    tensors = random_tensors(cfg)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(29, 600, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(29)]).int()
    w = torch.softmax(torch.randn(29, 3, generator=g), 1)
    assert torch.bincount(ids.flatten(), minlength=E).min() > 8
    (layout, bufs), = rank_layouts(cfg, tensors, 1, 1, dtype)
    assert max(layout.spec.units.exact) * 600 > 128 * 1024
    check(cpu_native.experts_forward_native(layout, bufs, x, w, ids), experts_forward(layout, bufs, x, w, ids),
          dtype)


def test_native_routing_inputs(monkeypatch):
    """vLLM's routing tensors as they come: int32 or int64 ids, bf16 or float32 weights; long batches in token
    chunks (one library call each); bad ids are an error."""
    (layout, bufs), = layouts("rs_moe", 1, 1, torch.float32, seed=4)
    x, w, ids = inputs(torch.float32, tokens=9, seed=6)
    ref = cpu_native.experts_forward_native(layout, bufs, x, w, ids)
    check(ref, experts_forward(layout, bufs, x, w, ids), torch.float32)
    monkeypatch.setattr(cpu_native, "CHUNK", 4)
    check(cpu_native.experts_forward_native(layout, bufs, x, w, ids), ref, torch.float32)
    monkeypatch.undo()
    assert torch.equal(cpu_native.experts_forward_native(layout, bufs, x, w, ids.long()), ref)
    wb = w.bfloat16()
    assert torch.equal(cpu_native.experts_forward_native(layout, bufs, x, wb, ids),
                       cpu_native.experts_forward_native(layout, bufs, x, wb.float(), ids))
    bad = ids.clone()
    bad[3, 1] = E
    with pytest.raises(ValueError, match="topk_ids has expert ids outside"):
        cpu_native.experts_forward_native(layout, bufs, x, w, bad)


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


# ----- FP8 factors: dequantized once at load on CPU ------------------------------------------------------------------
def fp8_layer(case: str, version: int | None = None):
    """(FP8 cfg, its tensors); ``version``: an older format version (its scale axes) instead of the current one."""
    from vllm_moe_lowrank.converters.quantize import quantize_layer

    plain = make_cfg(case)
    cfg = plain.model_copy(update={"factor_dtype": "fp8_e4m3", **({"format_version": version} if version else {})})
    return cfg, quantize_layer(cfg, 1, random_tensors(plain), None, None)[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_dequantized_at_load_matches_torch_path_on_fp8(case):
    """``LayerLayout.dequantize_at_load`` (what the plugin does on CPU): the CPU op on the float copies (native where
    the layer allows) gives the torch path's result on the FP8 buffers (dequantized per use)."""
    cfg, tensors = fp8_layer(case)
    for dtype in (torch.float32, torch.bfloat16):
        x, w, ids = inputs(dtype, tokens=37)
        layout = LayerLayout(cfg, 1, key=f"test.cpu.fp8.{case}.{dtype}")
        bufs = layout.new_buffers(dtype)
        for name in layout.blocks:
            layout.store(bufs, name, tensors[name])
        bufs.update(layout.finalize(bufs))
        ref = experts_forward(layout, bufs, x, w, ids)
        new = layout.dequantize_at_load(bufs, dtype)
        assert new and all(bufs[n].dtype == torch.float8_e4m3fn and t.dtype == dtype for n, t in new.items())
        bufs.update(new)
        assert not layout.quantized
        assert cpu_native.supports(layout, bufs, dtype) == (case in NATIVE)
        register_layout(layout)
        check(moe_lowrank_experts(x, w, ids, layout, [bufs[n] for n in layout.tensor_names]), ref, dtype)
        with pytest.raises(RuntimeError, match="needs a finalized FP8 layout"):
            layout.dequantize_at_load(bufs, dtype)


@pytest.mark.vllm
@pytest.mark.parametrize("case,version", [("mixed", None), ("rs_moe", 2)])
def test_plugin_dequantizes_fp8_factors_at_load_on_cpu(case, version):
    """The plugin's parameters: FP8 + float32 scales while loading (an FP8 checkpoint through vLLM's loaders), float
    after process_weights_after_loading on CPU, and the layer computes the materialized FP8 layer; a format-v2 one
    (down's kept-unit weight scaled per row, not per unit) still serves."""
    from test_kernels import reference
    from test_plugin import FakeExperts, load_like_vllm

    from vllm_moe_lowrank.plugin.method import MoELowRankMoEMethod

    cfg, tensors = fp8_layer(case, version)
    layer = FakeExperts(cfg.num_experts, cfg.hidden_size)
    method = MoELowRankMoEMethod(cfg, 1, None)
    method.create_weights(layer, cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, torch.float64)
    assert layer.w13_lr_u.dtype == torch.float8_e4m3fn and layer.w13_lr_u_scale.dtype == torch.float32
    if version == 2:  # one scale per hidden row of each expert's kept-unit down weight (v3: per kept unit)
        assert layer.w2_weight_scale.numel() == cfg.num_experts * cfg.hidden_size
    load_like_vllm(method, layer, cfg, tensors)
    method.process_weights_after_loading(layer)
    assert layer.w13_lr_u.dtype == layer.w2_shared_base.dtype == torch.float64
    x, w, ids = inputs(torch.float64)
    # float32 dequantization and act (LayerLayout.weight) against the reference's float64 act: float32 rounding
    torch.testing.assert_close(method.apply(layer, x, w, ids), reference(cfg, tensors, x, w, ids), rtol=1e-5,
                               atol=1e-7)
