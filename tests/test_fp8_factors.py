"""FP8 factors (format version ≥ 2, ``--factor-dtype fp8_e4m3``): specs with scales, rounding, the quantization-aware
refit, the torch compute path on dequantized FP8 factors for every term kind under TP/EP, and version-1 reading.

Layer level only (no vLLM); the served FP8 checkpoint is tests/test_vllm_offline.py's ``svd_fp8`` case.
"""

from __future__ import annotations

import json

import pytest
import torch
from specs import CASES
from test_kernels import E, N, make_cfg, random_tensors, reference, routing, run_ranks

from vllm_moe_lowrank.converters.calibration import LayerCalibration
from vllm_moe_lowrank.converters.experts import ExpertWeights
from vllm_moe_lowrank.converters.quantize import quantize_layer
from vllm_moe_lowrank.format import FORMAT_VERSION, MoELowRankConfig, scale_axis
from vllm_moe_lowrank.kernels import LayerLayout, experts_forward
from vllm_moe_lowrank.materialize import materialize_projection
from vllm_moe_lowrank.rounding import dequantize, quantize_rows


def fp8_cfg(case: str, seed: int = 0, **kw) -> MoELowRankConfig:
    return make_cfg(case, seed, **kw).model_copy(update={"factor_dtype": "fp8_e4m3"})


def fp8_tensors(cfg: MoELowRankConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float tensors of the layer, rounded to FP8 (no refit: no original weights)."""
    plain = make_cfg_like(cfg)
    out, _ = quantize_layer(cfg, 1, random_tensors(plain, seed=seed), None, None)
    return out


def make_cfg_like(cfg: MoELowRankConfig) -> MoELowRankConfig:
    return cfg.model_copy(update={"factor_dtype": None})


def test_specs_add_one_float32_scale_per_rank_or_row():
    cfg = fp8_cfg("mixed")
    specs = cfg.tensor_specs(1)
    plain = make_cfg_like(cfg).tensor_specs(1)
    data = {n: s for n, s in specs.items() if s.scale_of is None}
    assert set(data) == set(plain)  # same tensors, plus scales
    for name, s in data.items():
        if plain[name].dtype == "float":
            assert s.dtype == "fp8" and s.is_param
            sc = specs[s.scale]
            assert sc.dtype == "float32" and not sc.is_param and sc.scale_of == name
            assert s.scale_axis == scale_axis(s.proj, s.suffix) and sc.shape == (s.shape[s.scale_axis],)
        else:
            assert s.dtype == plain[name].dtype and s.scale is None
    kinds = (("gate", "lr_u"), ("down", "lr_v"), ("up", "weight"), ("down", "base"), ("gate", "res_eta"),
             ("down", "weight"))
    assert [scale_axis(p, sfx) for p, sfx in kinds] == [1, 0, 0, 0, 1, 1]
    assert [scale_axis(p, sfx, 2) for p, sfx in kinds] == [1, 0, 0, 0, 1, 0]  # version 2: down's weight per row


@pytest.mark.parametrize("version", [2, FORMAT_VERSION])
def test_down_kept_unit_weight_scales_per_unit_and_v2_rows_still_serve(version):
    """RS-MoE's kept-unit down weight [n, exact]: one float32 scale per kept unit (format v3: ``tensor_specs`` gives
    the scale shape [exact]); a version-2 FP8 layer (one scale per hidden row) still lays out, computes (torch path
    under TP/EP against its materialized weights) and dequantizes at load (the CPU serving path) along its own axis."""
    cfg = MoELowRankConfig.model_validate({**fp8_cfg("rs_moe", seed=1).model_dump(), "format_version": version})
    specs = cfg.tensor_specs(1)
    exact = cfg.layers[1].units.exact
    plain = random_tensors(make_cfg_like(cfg), seed=1)
    tensors, _ = quantize_layer(cfg, 1, plain, None, None)
    for e in range(E):
        s = specs[cfg.tensor_name(1, "down", "weight", e)]
        assert s.shape == (N, exact[e]) and s.scale_axis == (1 if version >= 3 else 0)
        assert specs[s.scale].shape == ((exact[e],) if version >= 3 else (N,))
        q, sc, w = tensors[s.name], tensors[s.scale], plain[s.name]
        sc = (sc[None, :] if version >= 3 else sc[:, None]).double()  # the axis, spelled out
        big = w.abs() > sc * 2 ** -6  # normal e4m3 values: round to nearest within 2^-4
        assert ((q.double() * sc - w).abs() <= (2 ** -4 + 1e-6) * w.abs())[big].all()
    x, w, ids = routing(seed=1)
    ref = reference(cfg, tensors, x, w, ids)
    assert (ref - reference(make_cfg_like(cfg), plain, x, w, ids)).norm() < 0.08 * ref.norm()
    for tp, ep in ((1, 1), (2, 1), (1, 2)):
        torch.testing.assert_close(run_ranks(cfg, tensors, x, w, ids, tp=tp, ep=ep, dtype=torch.float32), ref,
                                   rtol=1e-4, atol=1e-5)
    layout = LayerLayout(cfg, 1, tp_rank=1, tp_size=2)
    bufs = layout.new_buffers(torch.float32)
    for name in layout.blocks:
        layout.store(bufs, name, tensors[name])
    bufs.update(layout.finalize(bufs))
    before = experts_forward(layout, bufs, x.float(), w, ids)
    bufs.update(layout.dequantize_at_load(bufs, torch.float32))
    torch.testing.assert_close(experts_forward(layout, bufs, x.float(), w, ids), before)


def test_rounding_error_is_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g) * torch.logspace(-3, 1, 48)  # columns of very different magnitude
    for axis in (0, 1):
        q, s = quantize_rows(w, axis)
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (w.shape[axis],)
        back = dequantize(q, s, torch.float32, axis)
        # 3 mantissa bits: round to nearest is within 2^-4 relative for normal values
        rel = ((back - w).abs() / w.abs().clamp(min=1e-30))[w.abs() > s.max() * 2 ** -6]
        assert rel.max() <= 2 ** -4 + 1e-6
    zero = quantize_rows(torch.zeros(3, 4))
    assert torch.equal(zero[1], torch.ones(3)) and not dequantize(*zero).any()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (1, 2)])
def test_compute_path_on_fp8_factors(case, tp, ep):
    """experts_forward on FP8 buffers (dequantized per use) = the materialized dequantized weights."""
    cfg = fp8_cfg(case)
    tensors = fp8_tensors(cfg)
    x, w, ids = routing()
    ref = reference(cfg, tensors, x, w, ids)
    got = run_ranks(cfg, tensors, x, w, ids, tp=tp, ep=ep, dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    layout = LayerLayout(cfg, 1)
    bufs = layout.new_buffers(torch.float32)
    assert any(b.dtype == torch.float8_e4m3fn for b in bufs.values())
    assert all(b.dtype != torch.float8_e4m3fn or n.endswith("_scale") is False for n, b in bufs.items())


def test_fp8_is_close_to_the_float_factors():
    """Rounding every factor to FP8 moves the layer output by a few percent at most (random factors)."""
    cfg = fp8_cfg("svd")
    plain = random_tensors(make_cfg_like(cfg))
    q, _ = quantize_layer(cfg, 1, plain, None, None)
    x, w, ids = routing()
    ref = reference(make_cfg_like(cfg), plain, x, w, ids)
    err = (reference(cfg, q, x, w, ids) - ref).norm() / ref.norm()
    assert 1e-4 < err < 0.08


def test_store_refuses_wrong_dtypes_naming_the_tensor():
    cfg = fp8_cfg("svd")
    tensors = fp8_tensors(cfg)
    layout = LayerLayout(cfg, 1)
    bufs = layout.new_buffers(torch.float32)
    name = cfg.tensor_name(1, "gate", "lr_u", 0)
    with pytest.raises(ValueError, match=r"lr_u'.*float32.*wants float8_e4m3fn"):
        layout.store(bufs, name, tensors[name].float())
    with pytest.raises(ValueError, match=r"lr_u_scale'.*float8.*wants float32"):
        layout.store(bufs, name + "_scale", tensors[name + "_scale"].to(torch.float8_e4m3fn))


def _layer(seed: int, n: int, m: int, E: int):
    """Random experts with low-rank-ish structure and a calibration of skewed inputs."""
    g = torch.Generator().manual_seed(seed)

    def w(o, i):
        return (torch.randn(o, 4, generator=g) @ torch.randn(4, i, generator=g) + 0.3 * torch.randn(o, i, generator=g))

    weights = ExpertWeights(gate=torch.stack([w(m, n) for _ in range(E)]), up=torch.stack([w(m, n) for _ in range(E)]),
                            down=torch.stack([w(n, m) for _ in range(E)]))
    Tn = 400
    x = torch.randn(Tn, n, generator=g) * torch.linspace(0.1, 3, n)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(Tn)])
    calib = LayerCalibration(x=x, topk_ids=ids, topk_weights=torch.full((Tn, 2), 0.5), num_experts=E)
    return weights, calib


def test_refit_lowers_the_whitened_error():
    """Refitting each left factor against its rounded right factor (closed form, calibration Gram) gives a lower
    output error than rounding both factors, on every projection."""
    from vllm_moe_lowrank.converters.whitening import whitened_svd, whitening

    n, m = 24, 16
    cfg = fp8_cfg("svd", E=E, n=n, m=m)
    weights, calib = _layer(0, n, m, E)
    spec = cfg.layers[1]
    plain = {}
    for p in ("gate", "up", "down"):
        for e in range(E):
            G = calib.expert_gram_in(e) if p != "down" else calib.expert_gram_mid(e, weights)
            L, R = whitened_svd(weights.get(p, e, torch.float64), whitening(G)).factors(spec.proj(p).lowrank.ranks[e])
            plain[cfg.tensor_name(1, p, "lr_u", e)], plain[cfg.tensor_name(1, p, "lr_v", e)] = L, R
    rtn, info0 = quantize_layer(cfg, 1, plain, weights, calib, refit=False)
    fit, info = quantize_layer(cfg, 1, plain, weights, calib)
    assert info0["fp8_refit"] == 0 and info["fp8_refit"] == 3 * E
    for p in ("gate", "up"):
        def err(t):
            tot = 0.0
            for e in range(E):
                X = calib.inputs(e, torch.float64)
                D = weights.get(p, e, torch.float64) - materialize_projection(cfg, 1, p, e, t.__getitem__)
                tot += float((X @ D.T).square().sum())
            return tot
        assert err(fit) < err(rtn), p


def test_format_version_1_still_reads_and_refuses_v2_fields():
    cfg = make_cfg("svd").model_copy(update={"format_version": 1})
    MoELowRankConfig.model_validate(cfg.model_dump())
    with pytest.raises(ValueError, match="factor_dtype and linear_quantization need format_version >= 2"):
        MoELowRankConfig.model_validate({**cfg.model_dump(), "factor_dtype": "fp8_e4m3"})
    with pytest.raises(ValueError, match="format_version=4 is not supported.*supports 1, 2, 3"):
        MoELowRankConfig.model_validate({**cfg.model_dump(), "format_version": 4})


def test_v1_layer_computes_like_before():
    """A version-1 config (no factor_dtype) lays out and computes exactly like version 2 without FP8."""
    cfg1 = make_cfg("mixed", seed=2).model_copy(update={"format_version": 1})
    tensors = random_tensors(cfg1, seed=2)
    x, w, ids = routing(seed=2)
    torch.testing.assert_close(run_ranks(cfg1, tensors, x, w, ids), reference(cfg1, tensors, x, w, ids),
                               rtol=1e-9, atol=1e-9)


# ----- the converter: --factor-dtype fp8_e4m3 on the fixture ----------------------------------------------------
def test_convert_writes_fp8_and_counts_bytes(tmp_path, capsys):
    """The fixture at ratio 0.3 with FP8 factors: format v3 with float8 data and float32 scales, the report's bytes
    are the written tensors' bytes (≤ 0.36× the dense bf16 experts), its errors those of the written FP8 tensors,
    and --dry-run plans the same bytes."""
    from model_factory import FIXTURE
    from safetensors import safe_open

    from vllm_moe_lowrank.converters import cli
    from vllm_moe_lowrank.converters.arch import detect
    from vllm_moe_lowrank.converters.checkpoint import Checkpoint
    from vllm_moe_lowrank.converters.experts import load_expert_weights

    out = tmp_path / "fp8"
    args = ["--method", "svd", "--ratio", "0.3", str(FIXTURE), str(out), "--calib-data", str(FIXTURE / "calib.txt"),
            "--num-samples", "8", "--seq-len", "64"]
    cli.main([*args, "--factor-dtype", "fp8_e4m3"])
    assert "routed-expert bytes (fp8_e4m3 factors)" in capsys.readouterr().out
    rep = json.loads((out / "moe_lowrank_report.json").read_text())
    ck = Checkpoint(out)
    cfg = MoELowRankConfig.from_hf_config(ck.config)
    assert cfg.format_version == FORMAT_VERSION and cfg.factor_dtype == "fp8_e4m3" and rep["factor_dtype"] == "fp8_e4m3"
    specs = cfg.all_expert_tensor_specs()
    with safe_open(out / ck.info(next(iter(specs))).file, "pt") as f:
        name = next(n for n, s in specs.items() if s.dtype == "fp8" and n in f.keys())
        assert f.get_tensor(name).dtype == torch.float8_e4m3fn
        assert f.get_tensor(specs[name].scale).dtype == torch.float32
    written = sum(s.nbytes(2) for s in specs.values())
    b = rep["bytes"]
    assert b["expert_bytes"] == written and b["source_expert_bytes"] == 2 * cfg.original_expert_params()
    assert b["expert_bytes_vs_bf16"] <= 0.36 and b["checkpoint_bytes"] < b["source_checkpoint_bytes"]
    # the report's weight errors are those of the written (dequantized) tensors
    arch = detect(Checkpoint(FIXTURE).config)
    w = load_expert_weights(Checkpoint(FIXTURE), arch, 0)
    stored = ck.get_many(cfg.tensor_specs(0))
    num = sum(float((w.get("up", e, torch.float64) - materialize_projection(cfg, 0, "up", e, stored.__getitem__))
                    .square().sum()) for e in range(cfg.num_experts))
    den = sum(float(w.get("up", e, torch.float64).square().sum()) for e in range(cfg.num_experts))
    assert abs(rep["layers"]["0"]["weight_rel_err"]["up"] - (num / den) ** 0.5) < 1e-9
    # --dry-run: the same byte accounting, planned
    cli.main([*args[:5], str(tmp_path / "dry"), *args[6:], "--dtype", "fp8_e4m3", "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["factor_dtype"] == "fp8_e4m3" and plan["bytes"]["source_expert_bytes"] == b["source_expert_bytes"]
    assert abs(plan["bytes"]["expert_bytes_vs_bf16"] - 0.35) < 1e-3  # 0.7 of the params at 1 byte, scales aside


# ----- MoE layers left dense in an FP8 conversion (format.DenseQuant) ---------------------------------------------
def test_dense_kept_layer_of_a_float_source_in_128_blocks(tmp_path):
    """A float source's dense-kept layer with FP8 factors: every expert weight in 128×128 blocks (partial edge blocks:
    m = 200), scale shapes as dense_tensor_specs says, each block's values within e4m3 rounding of the float weight;
    dense_weight / the materializer dequantize it; a dense_quantization without FP8 factors is refused."""
    from safetensors.torch import save_file

    from vllm_moe_lowrank.converters.checkpoint import Checkpoint
    from vllm_moe_lowrank.converters.quantize import dense_fp8_tensors, dense_quant
    from vllm_moe_lowrank.format import DENSE_FP8, DenseQuant
    from vllm_moe_lowrank.materialize import dense_weight

    cfg = fp8_cfg("svd", n=136, m=200).model_copy(update={"dense_quantization": DENSE_FP8})
    g = torch.Generator().manual_seed(3)
    dense = {n: torch.randn(s.shape, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, s.shape[1])
             for n, s in cfg.dense_tensor_specs(0).items() if s.suffix == "weight"}
    save_file({"model.norm.weight": torch.ones(4)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    assert dense_quant(None) == DENSE_FP8
    out, requantized = dense_fp8_tensors(Checkpoint(tmp_path), dense, DENSE_FP8)
    specs = cfg.dense_tensor_specs(0)
    assert requantized and set(out) == set(specs)
    for name, s in specs.items():
        assert tuple(out[name].shape) == s.shape and out[name].dtype == s.torch_dtype, name
    name = cfg.tensor_name(0, "down", "weight", 1)
    assert specs[name + "_scale_inv"].shape == (2, 2) and specs[cfg.tensor_name(0, "up", "weight", 0)
                                                                + "_scale_inv"].shape == (2, 2)
    w, q, s = dense[name].float(), out[name], out[name + "_scale_inv"]
    for i in range(2):  # independent block loop: scale = block amax / 448, values round to nearest e4m3
        for j in range(2):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert torch.isclose(s[i, j], blk.abs().max() / 448)
            back = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float() * s[i, j]
            big = blk.abs() > s[i, j] * 2 ** -6
            assert ((back - blk).abs() / blk.abs())[big].max() <= 2 ** -4 + 1e-6
    got = dense_weight(cfg, 0, "down", 1, out.__getitem__)
    torch.testing.assert_close(got, w, rtol=2 ** -4, atol=float(s.max()) * 2 ** -9)
    assert torch.equal(materialize_projection(cfg, 0, "down", 1, out.__getitem__), got.double())
    with pytest.raises(ValueError, match="dense_quantization needs factor_dtype fp8_e4m3"):
        MoELowRankConfig.model_validate({**make_cfg("svd").model_dump(), "dense_quantization": DENSE_FP8.model_dump()})
    with pytest.raises(ValueError, match="block FP8 needs activation_scheme dynamic"):
        DenseQuant(activation_scheme="static", weight_block_size=(128, 128))
