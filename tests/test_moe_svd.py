"""moe-svd: exact ratios on the fixture, feasibility limits, and the factorization's defining properties."""

from __future__ import annotations

import json
import math

import pytest
import torch
from method_fakes import ARCH, CALIB, fake_calib, fake_weights, make_method
from model_factory import FIXTURE

from vllm_moe_lowrank.converters import cli
from vllm_moe_lowrank.converters.arch import detect
from vllm_moe_lowrank.converters.checkpoint import Checkpoint
from vllm_moe_lowrank.converters.errors import ConvertError, RatioError
from vllm_moe_lowrank.converters.experts import load_expert_weights
from vllm_moe_lowrank.converters.layer_fit import cast_layer
from vllm_moe_lowrank.converters.methods.moe_svd import (Factorization, _GramCache, allocate_ranks, layer_sensitivity,
                                                 project_group, trim)
from vllm_moe_lowrank.converters.verify import verify_checkpoint
from vllm_moe_lowrank.format import PROJS
from vllm_moe_lowrank.materialize import materialize_projection

D = 3 * 16 * 192 * 192  # dense params of one fixture MoE layer


def method(ratio: float, *options: str, arch=ARCH):
    return make_method("moe-svd", ratio, options, arch)




# ----- feasibility: refused up front with the limit stated -----------------------------------------------------
def test_feasible_ranges_follow_the_parameter_count():
    """The paper's accounting (preset=paper: k_U = E/4 left slots, V shared on down too)."""
    m = method(0.2, "preset=paper")
    kept_full = 3 * 5 * 192 * 192  # k_U = 4 slots + 1 shared right factor, rank 192, per projection
    lo, hi = m.ratio_range(1)
    assert lo == pytest.approx(1 - (3 * D + kept_full) / (4 * D))  # 0.1719
    assert hi == pytest.approx(1 - (3 * D + 3 * 5 * 192) / (4 * D))  # rank 1
    assert [m.num_decomposed() for m in (method(r, "preset=paper") for r in (0.2, 0.4, 0.6, 0.8))] == [1, 2, 3, 4]
    # the rank/selection trade-off: with 8 slots, 0.4 is reached by 2 layers at rank 68 or 3 layers at rank 159
    assert [method(0.4, "preset=paper", "k_u=8", f"num_layers={x}").num_decomposed() for x in ("min", "max", "3")] == [2, 3, 3]


@pytest.mark.parametrize("ratio, options, expect", [
    (0.1, [], "reaches ratios 0.1719-0.2496 (N=1), 0.3438-0.4992 (N=2)"),  # below one decomposed layer
    (0.3, [], "0.1719-0.2496 (N=1), 0.3438-0.4992 (N=2)"),  # the gap between one and two decomposed layers
    (0.6, ["edges=never"], "N of the 2 allowed MoE layers reaches ratios 0.1719-0.2496 (N=1), 0.3438-0.4992 (N=2);"),
    (0.2, ["num_layers=2"], "decomposing 2 layer(s) reaches ratios 0.3438 to 0.4992 only"),
    (0.4, ["selection=uniform"], "reaches ratios 0.6875 to 0.9984 only"),
])
def test_infeasible_ratios_are_refused_with_the_limit(ratio, options, expect):
    with pytest.raises(RatioError) as err:
        method(ratio, "preset=paper", *options).check_feasible()
    assert expect in str(err.value) and "moe-svd" in str(err.value)


@pytest.mark.parametrize("options, expect", [
    (["share=false", "k_u=2"], "share=false"),
    (["k_u=17"], "k_u=17"),
    (["layers=0,9"], "layers=[0, 9]"),
])
def test_inconsistent_options_are_refused(options, expect):
    with pytest.raises(RatioError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        method(0.2, *options).check_feasible()


def test_out_of_range_options_are_refused_when_parsed():
    with pytest.raises(ConvertError, match="group_size: Input should be greater than or equal to 1"):
        method(0.2, "group_size=0")


def test_options_parse_from_the_command_line_and_unknown_ones_are_listed():
    m = method(0.4, "layers=1, 2", "k_u=16", "share=true", "combine=mean", "selection=uniform")
    assert m.settings.layers == [1, 2] and m.settings.k_u == 16 and m.settings.combine == "mean"
    assert not m.needs_plan_pass and not method(0.4).needs_plan_pass  # default: every layer, no plan pass
    assert method(0.4, "selection=measured").needs_plan_pass and method(0.4, "preset=paper").needs_plan_pass
    with pytest.raises(ConvertError, match="combine"):
        method(0.4, "combine=product")
    with pytest.raises(ConvertError, match="Valid options: selection"):
        method(0.4, "rank=3")


def test_paper_defaults_per_expert_count():
    """App. D.3: 8 experts keep 2, 16 keep 4, 64 and more: groups of 8 keeping 2 each."""
    for E, groups, k in ((8, 1, 2), (16, 1, 4), (64, 8, 2), (128, 16, 2), (60, 8, 2)):
        arch = detect({**json.loads((FIXTURE / "config.json").read_text()), "num_experts": E}, "config.json")
        m = method(0.5, "preset=paper", arch=arch)
        assert len(m.groups()) == groups and sorted(e for g in m.groups() for e in g) == list(range(E))
        assert max(len(g) for g in m.groups()) - min(len(g) for g in m.groups()) <= 1
        assert m.k_u(len(m.groups()[0])) == k


def test_measured_defaults_and_the_paper_preset():
    """Defaults chosen by measurement (docs/methods/moe-svd.md): no trimming (k_u = group size), pooled
    frequency-weighted V, per-expert down; preset=paper restores the paper's settings for options not given."""
    m = method(0.5)
    assert (m.k_u(16), m.v_source(), m.shared_projs()) == (16, "pooled", ("gate", "up"))
    assert m.settings.combine == "refit" and m.fallback() and m.settings.selection == "uniform"
    p = method(0.5, "preset=paper")
    assert (p.k_u(16), p.v_source(), p.shared_projs()) == (4, "top", PROJS)
    assert p.settings.selection == "sensitivity" and p.settings.combine == "eq8"
    assert method(0.5, "preset=paper", "combine=refit", "k_u=8").k_u(16) == 8  # given options win
    assert method(0.5, "preset=paper", "combine=refit").settings.combine == "refit"


def test_pooled_basis_is_the_top_basis_when_the_group_is_one_expert_repeated():
    """With identical members (weights and inputs) the pooled, frequency-weighted basis spans e*'s own."""
    import dataclasses

    w1 = fake_weights(1, 12, 10)
    w = dataclasses.replace(w1, gate=w1.gate.repeat(4, 1, 1), up=w1.up.repeat(4, 1, 1), down=w1.down.repeat(4, 1, 1))
    c = fake_calib(4, 12, T=500)
    calib = dataclasses.replace(c, topk_ids=torch.arange(4).repeat(500, 1), topk_weights=torch.full((500, 4), 0.25),
                                num_experts=4, _index={}, _mean={})
    grams = _GramCache(w, calib, 1e-4, 0.1, torch.device("cpu"))
    top = project_group(w, grams, "gate", [0, 1, 2, 3], 4, 5, "refit", torch.device("cpu"))
    pooled = project_group(w, grams, "gate", [0, 1, 2, 3], 4, 5, "refit", torch.device("cpu"), calib.frequency())
    proj = lambda R: R.T @ torch.linalg.pinv(R.T)  # noqa: E731  projector onto the row space
    torch.testing.assert_close(proj(top.R0), proj(pooled.R0), atol=1e-6, rtol=1e-6)


def test_allocate_ranks_fills_the_budget_within_one_rank():
    facts = [Factorization("gate", 0, 10, 8), Factorization("up", 0, 7, 8), Factorization("down", 0, 13, 3)]
    gains = [torch.linspace(9, 1, 8), torch.linspace(5, 0, 8), torch.linspace(20, 10, 3)]
    for budget in range(30, 30 * 8, 7):
        ranks = allocate_ranks(budget, facts, gains)
        used = sum(f.cost * r for f, r in zip(facts, ranks))
        assert used <= budget and all(r <= f.cap for f, r in zip(facts, ranks))
        assert all(budget - used < f.cost for f, r in zip(facts, ranks) if r < f.cap)


# ----- the factorization -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def group():
    E, n, m = 6, 24, 20
    w, calib = fake_weights(E, n, m), fake_calib(E, n)
    grams = _GramCache(w, calib, 1e-4, 0.1, torch.device("cpu"))
    order = sorted(range(E), key=lambda e: (-float(calib.frequency()[e]), e))
    return w, calib, grams, order


def _direct_error(w, grams, p, e, L, R):
    """‖(W − L R) S‖² computed from the definition."""
    return float(((w.get(p, e, torch.float64) - L @ R) @ grams.white(p, e).S).square().sum())


@pytest.mark.parametrize("p", PROJS)
def test_shared_right_factor_is_the_source_svd_with_whitening_folded_in(group, p):
    """For e* the slot is U_r Σ_r and the error is the truncated whitened tail Σ_{i>r} σ_i² (Eckart-Young);
    the stored right factor is V_rᵀ S⁻¹ — one matrix for the group, no per-expert inverse."""
    w, _, grams, order = group
    r, src = 7, order[0]
    fit = project_group(w, grams, p, order, len(order), r, "refit", torch.device("cpu"))
    sigma = torch.linalg.svdvals(w.get(p, src, torch.float64) @ grams.white(p, src).S)
    L = fit.refit([0])
    assert fit.error(0, L) == pytest.approx(float(sigma[r:].square().sum()), rel=1e-8)
    # whitened right factor: R S has orthonormal rows
    RS = fit.R0 @ grams.white(p, src).S
    assert torch.allclose(RS @ RS.T, torch.eye(r, dtype=torch.float64), atol=1e-8)
    right, left = fit.balanced([L])
    assert torch.allclose(left[0] @ right, L @ fit.R0, atol=1e-10)


def test_error_model_and_refit_optimality(group):
    """The quadratic error model equals the definition; the refit slot is the least-squares optimum of its
    members, so the paper's sum / mean / literal Eq. 8 slots are never better."""
    w, _, grams, order = group
    p, r, k = "gate", 6, 3
    fits = {c: project_group(w, grams, p, order, k, r, c, torch.device("cpu")) for c in
            ("refit", "sum", "mean", "eq8", "alg3")}
    fit = fits["refit"]
    members = [2, 3, 4, 5]  # the trimmed class of k=3: positions ≥ k−1
    L = fit.slot(2, members, "refit")
    for i in members:
        assert fit.error(i, L) == pytest.approx(_direct_error(w, grams, p, order[i], L, fit.R0), rel=1e-9)
    best = sum(fit.error(i, L) for i in members)
    for c, f in fits.items():
        assert sum(fit.error(i, f.slot(2, members, c)) for i in members) >= best * (1 - 1e-12), c
    d = 1e-3 * torch.randn(L.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sum(fit.error(i, L + d) for i in members) > best


def test_full_rank_without_trimming_is_exact():
    """Sharing alone loses nothing at full rank: the shared right factor (rank = in ≤ out) is invertible and every
    expert gets its own refitted left factor."""
    E = 5
    for n, m in ((24, 20), (16, 20)):
        w, calib = fake_weights(E, n, m), fake_calib(E, n)
        grams = _GramCache(w, calib, 1e-4, 0.1, torch.device("cpu"))
        order = sorted(range(E), key=lambda e: (-float(calib.frequency()[e]), e))
        for p in PROJS:
            out, inp = w.proj(p).shape[1:]
            if inp > out:
                continue
            fit = project_group(w, grams, p, order, E, inp, "refit", torch.device("cpu"))
            for pi, e in enumerate(order):
                W = w.get(p, e, torch.float64)
                assert (W - fit.refit([pi]) @ fit.R0).norm() / W.norm() < 1e-10, (n, m, p, e)


def test_trimming_follows_eq7_combinations(group):
    """Position π uses combination min(π, k−1): exactly k slots {U1}, {U1+U2}, ..., (Alg. 3)."""
    w, _, grams, order = group
    fits = {p: project_group(w, grams, p, order, 4, 5, "sum", torch.device("cpu")) for p in PROJS}
    slot_of, slots = trim(fits, 4, "sum")
    assert slot_of == [0, 1, 2, 3, 3, 3] and all(len(s) == 4 for s in slots.values())
    f = fits["up"]
    assert torch.allclose(slots["up"][2], f.refit([0]) + f.refit([1]) + f.refit([2]))


def test_layer_sensitivity_components(group):
    w, calib, _, _ = group
    s = layer_sensitivity(w, calib)
    f, p, a = (torch.tensor(s[k], dtype=torch.float64) for k in "fpa")
    assert f.sum() == pytest.approx(2.0, abs=1e-5)  # Σ f_i = top-k
    assert ((p > 0) & (p <= 20)).all() and ((a >= 0) & (a < 1)).all()
    assert s["S"] == pytest.approx(float((f * p * a).sum()), rel=1e-4)


def test_every_ablation_compresses_a_real_layer():
    """Each ablation's layer from real fixture weights follows the format and its budget exactly."""
    weights = load_expert_weights(Checkpoint(FIXTURE), ARCH, 1)
    calib = fake_calib(16, 192, T=2000, k=4)
    for opts in ([], ["combine=sum"], ["combine=mean"], ["combine=eq8"], ["combine=alg3"], ["k_u=16"],
                 ["k_u=1"], ["group_size=8", "k_u=2"], ["share=false"], ["preset=paper"]):
        m = method(0.23, "layers=1", *opts, *([] if "share=false" in opts else ["fallback=false"]))  # fallback: below
        m.check_feasible()
        comp = m.compress_layer(1, weights, calib)
        tensors = cast_layer(ARCH, "moe-svd", 1, comp, torch.float32)  # names and shapes checked here
        kept = sum(t.numel() for t in tensors.values())
        budget = m.plan()["decomposed"]["1"]
        assert budget - 3 * (4 + 1) * 192 < kept <= budget, opts
        if "share=false" not in opts:
            lr = comp.spec.gate.lowrank
            assert lr.right_groups is not None and lr.left_slots is not None


def test_holdout_split_is_deterministic_disjoint_and_keeps_whole_sequences():
    """The held part is the last whole blocks (calibration sequences) of the tokens, the fit part the rest: views,
    disjoint, covering, the same every time; with fewer than two blocks a plain 3:1 cut."""
    calib = fake_calib(8, 24, T=1100)
    fit, held = calib.holdout_split()
    assert (fit.num_tokens, held.num_tokens) == (768, 332)  # 4 blocks of 256: one held (+ the partial tail)
    assert torch.equal(torch.cat([fit.x, held.x]), calib.x) and torch.equal(held.topk_ids, calib.topk_ids[768:])
    assert fit.x.data_ptr() == calib.x.data_ptr() and held.opts is calib.opts  # views, same options
    again = calib.holdout_split()[1]
    assert torch.equal(again.x, held.x) and torch.equal(again.topk_weights, held.topk_weights)
    assert [c.num_tokens for c in fake_calib(8, 24, T=100).holdout_split()] == [75, 25]


def test_fallback_is_decided_on_held_out_tokens():
    """Same fit tokens, two held-out quarters: the decision follows the held-out tokens (one favouring the shared
    fit, one per-expert SVD), its recorded errors are the candidates' (fitted on the first 3/4) on exactly those
    tokens, and the kept fit is refitted on every token. fallback=false (and preset=paper) keep the shared fit."""
    import dataclasses

    from vllm_moe_lowrank.converters.calibration import LayerCalibration, routed_output_sq_error

    arch = dataclasses.replace(ARCH, num_layers=4, moe_layers=(0, 1, 2, 3), num_experts=8, hidden_size=24,
                               intermediate_size=20)
    weights, pool = fake_weights(8, 24, 20, seed=1), fake_calib(8, 24, T=768 + 2048, seed=1)
    m = method(0.5, arch=arch)
    fit = LayerCalibration(x=pool.x[:768], topk_ids=pool.topk_ids[:768], topk_weights=pool.topk_weights[:768],
                           num_experts=8)
    rest = LayerCalibration(x=pool.x[768:], topk_ids=pool.topk_ids[768:], topk_weights=pool.topk_weights[768:],
                            num_experts=8)
    budget = m.plan()["decomposed"]["1"]
    cands = {k: f(1, weights, fit, _GramCache(weights, fit, 1e-4, 0.1, torch.device("cpu")), budget)
             for k, f in (("shared", m._shared), ("per_expert", m._per_expert))}
    dy2 = {k: routed_output_sq_error(arch, 1, c, weights, rest) for k, c in cands.items()}  # [2048] each
    d = dy2["shared"] - dy2["per_expert"]
    assert float(d.min()) < 0 < float(d.max())  # some tokens favour each fit
    for want, idx in ((True, d.argsort()[:256]), (False, d.argsort()[-256:])):
        calib = LayerCalibration(x=torch.cat([fit.x, rest.x[idx]]), num_experts=8,
                                 topk_ids=torch.cat([fit.topk_ids, rest.topk_ids[idx]]),
                                 topk_weights=torch.cat([fit.topk_weights, rest.topk_weights[idx]]))
        comp = m.compress_layer(1, weights, calib)
        info = comp.info["sharing_pays"]
        assert info["shared"] is want and (comp.spec.gate.lowrank.right_groups is not None) is want
        for k in cands:
            assert info[f"{k}_rms_dy"] == pytest.approx(float(dy2[k][idx].mean()) ** 0.5, rel=1e-5)
        full = _GramCache(weights, calib, 1e-4, 0.1, torch.device("cpu"))
        refit = (m._shared if want else m._per_expert)(1, weights, calib, full, budget)
        assert all(torch.allclose(comp.tensors[k], refit.tensors[k]) for k in refit.tensors)
    shared = method(0.5, "fallback=false", arch=arch).compress_layer(1, weights, pool)
    assert "sharing_pays" not in shared.info and shared.spec.gate.lowrank.right_groups is not None
    assert not method(0.5, "preset=paper").fallback()


def test_plan_pass_ranks_layers_and_round_trips_through_json():
    """The measured selection avoids the layer whose MoE output weighs most in the residual stream; the plan is
    JSON (what --resume reads back) and the S_L selection puts the edge layers last."""
    import dataclasses

    arch = dataclasses.replace(ARCH, num_layers=4, moe_layers=(0, 1, 2, 3), num_experts=8, hidden_size=24,
                               intermediate_size=20)
    data = {l: (fake_weights(8, 24, 20, seed=l), fake_calib(8, 24, T=800, seed=l)) for l in range(4)}
    plans = {}
    for selection in ("measured", "sensitivity"):
        m = method(0.4, f"selection={selection}", arch=arch)
        m.check_feasible()
        for l, (w, c) in data.items():
            m.observe_hidden(l, [torch.full((2, 5, 24), 0.1 if l == 2 else 10.0)])  # layer 2: a thin residual
            m.observe_layer(l, w, c)
        plans[selection] = m.make_plan()
        assert json.loads(json.dumps(plans[selection])) == plans[selection]
    assert "2" not in plans["measured"]["decomposed"] and len(plans["measured"]["decomposed"]) == 2
    assert plans["measured"]["order_by_sensitivity"][-1] == 2
    assert set(plans["sensitivity"]["decomposed"]) == {"1", "2"}  # the middle layers before the edges


# ----- end to end on the fixture ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-svd")
    out = {}
    for ratio, opts in ((0.2, ["-o", "preset=paper", "-o", "selection=measured", "-o", "combine=refit"]),
                        (0.6, ["-o", "selection=sensitivity"]), (0.8, ["-o", "selection=uniform"])):
        out[ratio] = root / f"moe-svd-{ratio}"
        cli.main(["--method", "moe-svd", "--ratio", str(ratio), str(FIXTURE), str(out[ratio]), *CALIB,
                  "--dtype", "float32", *opts])
    return out


@pytest.mark.parametrize("ratio", [0.2, 0.6, 0.8])
def test_achieved_ratio_recounted_from_written_tensors(converted, ratio):
    cfg, counts = verify_checkpoint(converted[ratio])
    assert abs(counts.achieved_ratio - ratio) <= 0.005
    report = json.loads((converted[ratio] / "moe_lowrank_report.json").read_text())
    assert report["achieved_ratio"] == pytest.approx(counts.achieved_ratio, abs=1e-12)
    assert len(cfg.layers) == {0.2: 1, 0.6: 3, 0.8: 4}[ratio]


def test_selection_and_layout_on_the_fixture(converted):
    """0.2: one layer, measured as the least damaging; 0.6 by S_L keeps an edge layer dense (paper); identical
    experts share (slot, group) everywhere, and they materialize to identical weights."""
    cfg, _ = verify_checkpoint(converted[0.2])
    report = json.loads((converted[0.2] / "moe_lowrank_report.json").read_text())
    (layer,) = cfg.layers
    sel = report["layers"][str(layer)]["selection"]
    assert sel["decomposed"] == [layer] and "error" in sel and "S" in sel
    cfg6, _ = verify_checkpoint(converted[0.6])
    assert cfg6.dense_layers() in ([0], [3])
    stored = Checkpoint(converted[0.2]).get_many(cfg.tensor_specs(layer))
    for p in PROJS:
        lr = cfg.layers[layer].proj(p).lowrank
        assert set(lr.right_groups) == {0} and sorted(set(lr.left_slots)) == [0, 1, 2, 3]
        trimmed = [e for e in range(16) if lr.left_slots[e] == 3]
        assert len(trimmed) == 13
        ws = [materialize_projection(cfg, layer, p, e, stored.__getitem__) for e in trimmed]
        assert all(torch.equal(ws[0], x) for x in ws[1:])
    assert math.isfinite(report["layers"][str(layer)]["output_rel_err"])
