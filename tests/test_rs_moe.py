"""rs-moe: partition and rank accounting, ACI terms, ridge base and down refit, MINE + QP budgets, and the
fixture end to end (achieved ratio recounted from the written tensors, ablation options)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_moe_lowrank.converters.methods import rs_moe
from vllm_moe_lowrank.converters.arch import MoEArch
from vllm_moe_lowrank.converters.calibration import LayerCalibration
from vllm_moe_lowrank.converters.errors import ConvertError, RatioError
from vllm_moe_lowrank.converters.experts import ExpertWeights
from vllm_moe_lowrank.converters.method import MethodContext, build_method, parse_options
from vllm_moe_lowrank.converters.methods.rs_moe import (RSMoEMethod, _rank_cap, activation_stats,
                                                 allocate_ranks, downstream_alignment, partition)
from vllm_moe_lowrank.converters.methods.rs_moe_mi import (mine_mi, pca_features, pool_windows, qp_save_ratios,
                                                    redundancy)
from vllm_moe_lowrank.format import FORMAT_VERSION, PROJS, MoELowRankConfig, ProjNames
from vllm_moe_lowrank.materialize import materialize_projection

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "qwen3-moe-pydocs"
FAST_MINE = ["mine_steps=40", "mine_hidden=16"]


# ----- synthetic layer ----------------------------------------------------------------------------------------
E, N_HID, M_INT, TOKENS, TOPK = 6, 16, 12, 400, 2


def _arch(num_layers: int = 2) -> MoEArch:
    return MoEArch(model_type="qwen3_moe", num_layers=num_layers, moe_layers=tuple(range(num_layers)), num_experts=E,
                   top_k=TOPK, hidden_size=N_HID, intermediate_size=M_INT,
                   moe_prefix="model.layers.{layer}.mlp.experts", expert_names=ProjNames())


def _weights(seed: int) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    return ExpertWeights(gate=torch.randn(E, M_INT, N_HID, generator=g) / 4,
                         up=torch.randn(E, M_INT, N_HID, generator=g) / 4,
                         down=torch.randn(E, N_HID, M_INT, generator=g) / 4)


def _calib(seed: int = 0) -> LayerCalibration:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, N_HID, generator=g)
    logits = torch.randn(TOKENS, E, generator=g) + torch.linspace(2, -2, E)  # skewed routing: rare experts
    w, ids = logits.softmax(-1).topk(TOPK, dim=-1)
    return LayerCalibration(x=x, topk_ids=ids, topk_weights=w / w.sum(-1, keepdim=True), num_experts=E)


def _method(ratio: float, options: list[str] = (), layers: int = 2) -> RSMoEMethod:
    arch = _arch(layers)
    ctx = MethodContext(arch=arch, ratio=ratio, device=torch.device("cpu"), load_experts=lambda l: _weights(100 + l))
    return build_method("rs-moe", ctx, ["budget=uniform", *options])


def _layer_config(method: RSMoEMethod, comp) -> MoELowRankConfig:
    a = method.arch
    return MoELowRankConfig(format_version=FORMAT_VERSION, method="rs-moe", num_experts=a.num_experts,
                            hidden_size=a.hidden_size, intermediate_size=a.intermediate_size, moe_prefix=a.moe_prefix,
                            moe_layers=list(a.moe_layers), layers={0: comp.spec})


def _check_layer(method: RSMoEMethod, comp, weights: ExpertWeights) -> MoELowRankConfig:
    """Tensors match the format's names and shapes, their count is the plan's cost, and exact units are exact."""
    cfg = _layer_config(method, comp)
    specs = cfg.tensor_specs(0)
    named = {cfg.tensor_name(0, p, sfx, e): t for (p, sfx, e), t in comp.tensors.items()}
    assert set(named) == set(specs)
    for name, spec in specs.items():
        assert tuple(named[name].shape) == spec.shape, name
    params = sum(t.numel() for n, t in named.items() if specs[n].is_param)
    assert params == comp.info["cost"] <= comp.info["budget"]
    get = named.__getitem__
    for e in range(E):
        k = comp.spec.units.exact[e]
        exact_rows = comp.tensors["gate", "weight", e]  # [k, n]: rows of the original gate, unchanged
        if k:
            assert torch.cdist(exact_rows.float(), weights.gate[e].float()).amin(1).max() == 0
        torch.testing.assert_close(materialize_projection(cfg, 0, "gate", e, get)[:k].float(), exact_rows.float())
    return cfg


# ----- partition and ranks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("high_frac,low_frac,base", [(0.8, 0.1, True), (0.8, 0.0, False), (1.0, 0.1, True),
                                                      (0.0, 0.3, True), (0.5, 0.0, True)])
def test_partition_meets_budget(high_frac, low_frac, base):
    Ex, m, n = 8, 32, 24
    scores = torch.rand(Ex, m, generator=torch.Generator().manual_seed(1)) ** 3
    order = torch.argsort(scores.reshape(-1), descending=True)
    full = 3 * Ex * n * m
    for keep in (0.02, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95, 0.99):
        budget = int(keep * full)
        plan = partition(scores, budget, n, high_frac, low_frac, base)
        cost = plan.cost()
        assert cost <= budget
        assert budget - cost < 3 * n + m + n, (keep, budget, cost)  # within one unit or one rank
        ex = torch.zeros(Ex, m, dtype=torch.bool)
        lr = torch.zeros(Ex, m, dtype=torch.bool)
        for e in range(Ex):
            ex[e, plan.exact[e]] = True
            lr[e, plan.lowrank[e]] = True
            for p in PROJS:
                assert plan.ranks[p][e] <= _rank_cap(len(plan.lowrank[e]), n)
            if len(plan.lowrank[e]):
                assert min(plan.ranks["gate"][e], plan.ranks["up"][e]) > 0
        assert not (ex & lr).any()
        n_ex = int(ex.sum())
        assert set(order[:n_ex].tolist()) == set(ex.reshape(-1).nonzero().flatten().tolist())  # top units exact
        if high_frac == 1.0:
            assert not lr.any() and not plan.base  # "100%high": structured pruning
        if not base:
            assert not plan.base


def test_allocate_ranks_equal_k_and_leftover():
    L, n = [10, 20, 0, 5], 24
    budget = 1500
    ranks = allocate_ranks(L, budget, n)
    spent = sum(ranks[p][e] * (L[e] + n) for p in PROJS for e in range(4))
    assert spent <= budget and budget - spent < min(l + n for l in L if l)
    assert ranks["gate"][2] == ranks["up"][2] == ranks["down"][2] == 0
    for e in range(4):  # one k per expert, ± the one-rank top-up
        assert max(ranks[p][e] for p in PROJS) - min(ranks[p][e] for p in PROJS) <= 1
    capped = allocate_ranks(L, 10 ** 6, n)  # more budget than the caps can use: every factorization at its cap
    assert all(capped[p][e] == _rank_cap(L[e], n) for p in PROJS for e in range(4))


def test_rank_cap_keeps_lowrank_cheaper():
    for L in range(1, 60):
        k = _rank_cap(L, 24)
        assert k * (L + 24) < L * 24 or k == 0
        assert (k + 1) * (L + 24) >= L * 24 or k == min(L, 24)


# ----- ACI ----------------------------------------------------------------------------------------------------
def test_activation_stats_alg1():
    h = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    r = torch.tensor([0.5, 2.0])
    mean_sq, var_sq, peak = activation_stats(h, r)
    a = h * r[:, None]  # W_act = H·r
    torch.testing.assert_close(mean_sq.float(), (a ** 2).mean(0))
    torch.testing.assert_close(var_sq.float(), (a ** 2).var(0, unbiased=False))
    torch.testing.assert_close(peak.float(), a.abs().amax(0))
    assert activation_stats(torch.zeros(0, 3), torch.zeros(0))[2].shape == (3,)


def test_downstream_alignment_matches_definition(monkeypatch):
    w, nxt = _weights(0), _weights(1)
    monkeypatch.setattr(rs_moe, "_BLOCK", 2 * M_INT * M_INT)  # force chunks of 2 next-layer experts
    got = downstream_alignment(w.down, nxt.gate, nxt.up)
    v_in = ((nxt.gate + nxt.up) / 2).reshape(-1, N_HID).double()  # [E'·m', n]
    for e in range(E):
        want = (w.down[e].double().T @ v_in.T).abs() @ v_in.norm(dim=1)
        torch.testing.assert_close(got[e], want, rtol=1e-5, atol=1e-6)


def test_aci_downstream_term_only_with_a_next_moe_layer():
    w, calib = _weights(0), _calib()
    m_last = _method(0.4, ["gamma=0.05"])
    m_none = _method(0.4, ["gamma=0"])
    torch.testing.assert_close(m_last.unit_scores(1, w, calib), m_none.unit_scores(1, w, calib))  # last layer
    assert not torch.allclose(m_last.unit_scores(0, w, calib), m_none.unit_scores(0, w, calib))


# ----- the layer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [[], ["score=magnitude"], ["score=activation"], ["score=peak"], ["base=none"],
                                     ["base=freq"], ["down_fit=delta"], ["aci_norm=max"], ["high_frac=1"],
                                     ["low_frac=0", "high_frac=0.5"]])
def test_compress_layer_options(options):
    w, calib = _weights(0), _calib()
    method = _method(0.5, ["select=fixed", *options])
    comp = method.compress_layer(0, w, calib)
    _check_layer(method, comp, w)
    assert comp.info["budget"] - comp.info["cost"] < 3 * N_HID + M_INT + N_HID
    if "base=none" in options or "high_frac=1" in options:
        assert comp.spec.down.base is None
    else:
        assert comp.spec.down.base is not None


def test_compress_layer_is_deterministic():
    w, calib = _weights(0), _calib()
    a = _method(0.6).compress_layer(0, w, calib)
    b = _method(0.6).compress_layer(0, w, calib)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def _low_rank_weights(rank: int, seed: int) -> ExpertWeights:
    """Experts of exact rank ``rank`` in every projection: per-expert SVD at that rank reproduces them."""
    g = torch.Generator().manual_seed(seed)
    lr = lambda o, i: (torch.randn(E, o, rank, generator=g) @ torch.randn(E, rank, i, generator=g)) / 3  # noqa: E731
    return ExpertWeights(gate=lr(M_INT, N_HID), up=lr(M_INT, N_HID), down=lr(N_HID, M_INT))


def test_held_out_choice_picks_per_expert_svd_where_it_is_exact():
    """Rank-2 experts at a budget of rank ≥ 3 per factorization: per-expert whitened SVD reproduces gate and up
    (down only up to the Gram regularization of its refit), while every split that keeps exact units must prune or
    truncate, so the held-out choice is the degenerate split: its held-out error is the lowest, and the layer is
    written as per-expert SVD refitted on all calibration tokens (no units split, no base)."""
    from vllm_moe_lowrank.converters.methods.rs_moe_select import SVD_SPLIT

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, N_HID, generator=g)  # ~680 tokens per expert: the regularization bias stays small
    rw, ids = torch.randn(2048, E, generator=g).softmax(-1).topk(TOPK, dim=-1)
    calib = LayerCalibration(x=x, topk_ids=ids, topk_weights=rw / rw.sum(-1, keepdim=True), num_experts=E)
    w = _low_rank_weights(2, 5)
    method = _method(0.5)
    comp = method.compress_layer(0, w, calib)
    choice = comp.info["held_out_choice"]
    assert choice["split"] == "svd" and comp.spec.units is None and comp.spec.down.base is None
    assert set(choice["rms_dy"]) >= {"svd", "high0.8_low0.1_ridge"}
    assert choice["rms_dy"]["svd"] < 0.25 * min(v for k, v in choice["rms_dy"].items() if k != "svd")
    again = method.fit_split(0, w, calib, method.layer_params(0), SVD_SPLIT)
    assert all(torch.equal(again.tensors[k], comp.tensors[k]) for k in comp.tensors)


def test_held_out_choice_is_the_argmin_of_the_fit_part_candidates():
    """Every candidate refitted here on the fit part and scored on the held-out part gives the errors the layer
    recorded, the written split is their argmin (never above per-expert SVD's), and the written layer is that
    split refitted on all tokens (same tensors as fit_split on the whole calibration)."""
    from vllm_moe_lowrank.converters.calibration import routed_output_sq_error
    from vllm_moe_lowrank.converters.methods.rs_moe_select import candidates

    w, calib = _weights(0), _calib()
    method = _method(0.7)
    comp = method.compress_layer(0, w, calib)
    choice = comp.info["held_out_choice"]
    fit, held = calib.holdout_split()
    s = method.settings
    budget = method.layer_params(0)
    errs = {}
    for c in candidates(s.high_frac, s.low_frac, s.base):
        errs[c.label] = float(routed_output_sq_error(method.arch, 0, method.fit_split(0, w, fit, budget, c), w,
                                                     held).mean().sqrt())
    assert errs == pytest.approx(choice["rms_dy"], rel=1e-5)
    assert choice["split"] == min(errs, key=errs.__getitem__) and errs[choice["split"]] <= errs["svd"]
    best = next(c for c in candidates(s.high_frac, s.low_frac, s.base) if c.label == choice["split"])
    again = method.fit_split(0, w, calib, budget, best)
    assert again.tensors.keys() == comp.tensors.keys()
    assert all(torch.equal(again.tensors[k], comp.tensors[k]) for k in comp.tensors)


def _plan_with_full_down_rank(method, w, calib):
    scores = method.unit_scores(0, w, calib)
    plan = partition(scores, method.layer_params(0), N_HID, 0.5, 0.1, True)
    plan.ranks["down"] = [len(l) for l in plan.lowrank]
    return plan


def test_ridge_base_solves_normal_equations():
    """J(B) = Σ_e ‖T_e − Z_e Bᵀ‖² + λ'‖B‖²: the base satisfies (ΣZᵀZ + λ'I) Bᵀ = ΣZᵀT."""
    w, calib = _weights(0), _calib()
    method = _method(0.5)
    plan = _plan_with_full_down_rank(method, w, calib)
    gate_up = method._gate_up(w, calib, plan)
    _, G_all, C_all = method._down_stats(w, calib, plan, gate_up)
    B = method._base(w, calib, G_all, C_all)  # [n, m]
    G = torch.zeros(M_INT, M_INT, dtype=torch.float64)
    C = torch.zeros(M_INT, N_HID, dtype=torch.float64)
    for e in range(E):
        L, S = plan.lowrank[e], plan.exact[e]
        if not len(L) or not calib.token_index(e).numel():
            continue
        g = calib.route_weight(e).double()[:, None]  # rows weighted by g: the routing-weighted fit
        h, h_lr = (t.double() * g for t in method._expert_acts(w, calib, e, gate_up[e]))
        Z = torch.zeros_like(h)
        Z[:, L] = h_lr
        rest = torch.ones(M_INT, dtype=torch.bool)
        rest[S] = False
        T = h[:, rest] @ w.down[e].double()[:, rest].T
        G += Z.T @ Z
        C += Z.T @ T
    lam = 1e-3 * torch.trace(G) / M_INT
    torch.testing.assert_close((G + lam * torch.eye(M_INT, dtype=torch.float64)) @ B.T, C, rtol=1e-4, atol=1e-5)


def test_down_refit_at_full_rank_is_the_regularized_least_squares_fit():
    """min_Δ ‖T − ĥ(B_L + Δ)ᵀ‖² + μ‖Δ − Δ0‖² is solved exactly when the rank is not truncated."""
    w, calib = _weights(0), _calib()
    method = _method(0.5)
    plan = _plan_with_full_down_rank(method, w, calib)
    gate_up = method._gate_up(w, calib, plan)
    stats, G_all, C_all = method._down_stats(w, calib, plan, gate_up)
    B = method._base(w, calib, G_all, C_all)
    down = method._down(w, plan, stats, B)
    e = max(range(E), key=lambda i: len(plan.lowrank[i]))
    L, S = plan.lowrank[e], plan.exact[e]
    Ld, Rd = down[e]
    delta = Ld @ Rd  # [n, |L|]
    g = calib.route_weight(e).double()[:, None]
    h, h_lr = (t.double() * g for t in method._expert_acts(w, calib, e, gate_up[e]))
    rest = torch.ones(M_INT, dtype=torch.bool)
    rest[S] = False
    T = h[:, rest] @ w.down[e].double()[:, rest].T
    G = h_lr.T @ h_lr
    mu = 1e-2 * torch.trace(G) / len(L)
    delta0 = w.down[e].double()[:, L] - B[:, L]
    grad = -(T - h_lr @ (B[:, L] + delta).T).T @ h_lr + mu * (delta - delta0)  # ½ ∂J/∂Δ
    assert grad.abs().max() < 1e-4 * (1 + (T.T @ h_lr).abs().max())  # float32 activations


def test_feasibility_error_states_the_limit():
    with pytest.raises(RatioError, match="largest feasible ratio is 0.9"):
        _method(0.99).check_feasible()
    _method(0.9).check_feasible()


def test_options_parse_and_reject():
    s = parse_options(RSMoEMethod, ["score=magnitude", "budget=uniform", "base=none", "high_frac=0.9"])
    assert (s.score, s.budget, s.base, s.high_frac) == ("magnitude", "uniform", "none", 0.9)
    with pytest.raises(ConvertError, match="Valid options"):
        parse_options(RSMoEMethod, ["score=fisher"])
    with pytest.raises(ConvertError):
        parse_options(RSMoEMethod, ["high_frac=1.5"])


# ----- MINE + QP ----------------------------------------------------------------------------------------------
def test_qp_budgets_mean_bounds_and_order():
    R = [0.5, 2.0, 1.0, 3.0, 0.2]
    for s_bar in (0.2, 0.5, 0.8):
        s = qp_save_ratios(R, s_bar, kappa=0.3, smooth=0.2, reg=0.1, bound=0.3)
        assert abs(sum(s) / len(s) - s_bar) < 1e-9
        assert all(s_bar * 0.7 - 1e-9 <= v <= min(1, s_bar * 1.3) + 1e-9 for v in s)
        assert s[3] < s[0] and s[4] > s[1]  # more redundant, smaller budget
    assert qp_save_ratios([1.0, 1.0, 1.0], 0.4) == [0.4] * 3
    a, b = qp_save_ratios(R, 0.3), qp_save_ratios(R, 0.6)
    torch.testing.assert_close(torch.tensor(a) / 0.3, torch.tensor(b) / 0.6)  # the profile scales with s̄


def test_redundancy_averages_available_neighbours():
    assert redundancy([1.0, 3.0, 5.0], [0, 1, 2, 3], 4) == [1.0, 2.0, 4.0, 5.0]


def test_mine_separates_dependent_from_independent():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 4, generator=g)
    dep = mine_mi(a, a + 0.3 * torch.randn(512, 4, generator=g), steps=150, hidden=32, seed=1)
    ind = mine_mi(a, torch.randn(512, 4, generator=g), steps=150, hidden=32, seed=1)
    assert dep > 1.0 and dep > ind + 0.8
    assert mine_mi(a, a, steps=20, hidden=8, seed=3) == mine_mi(a, a, steps=20, hidden=8, seed=3)  # seeded


def test_pooling_and_pca():
    h = [torch.randn(2, 10, 6), torch.randn(3, 10, 6)]
    assert pool_windows(h, 4).shape == (5 * 2, 6)
    assert pool_windows(h, 0).shape == (5, 6)
    z = pca_features(torch.randn(50, 8) * torch.arange(1, 9), 3)
    assert z.shape == (50, 3)
    torch.testing.assert_close(z.var(0), torch.ones(3), rtol=1e-4, atol=1e-4)


def test_plan_is_json_and_reproducible():
    arch = _arch(3)
    ctx = MethodContext(arch=arch, ratio=0.5, device=torch.device("cpu"), load_experts=lambda l: _weights(l))
    plans = []
    for _ in range(2):
        m = build_method("rs-moe", ctx, FAST_MINE)
        assert m.needs_plan_pass
        g = torch.Generator().manual_seed(0)
        h = torch.randn(4, 64, N_HID, generator=g)
        for l in range(3):
            h = h + 0.5 * torch.randn(4, 64, N_HID, generator=g)
            m.observe_hidden(l, [h])
        plans.append(json.dumps(m.make_plan(), sort_keys=True))
    assert plans[0] == plans[1]
    plan = json.loads(plans[0])
    m.load_plan(plan)
    assert abs(sum(m.save_ratio(l) for l in range(3)) / 3 - 0.5) < 1e-9
    assert sum(m.layer_params(l) for l in range(3)) <= 3 * (3 * E * N_HID * M_INT) * 0.5


# ----- the fixture end to end ---------------------------------------------------------------------------------
def _convert(tmp_path: Path, ratio: float, options: list[str]):
    from vllm_moe_lowrank.converters.pipeline import ConvertOptions, convert
    from vllm_moe_lowrank.converters.verify import verify_checkpoint

    out = tmp_path / f"rs-{ratio}"
    report = convert(ConvertOptions(method="rs-moe", ratio=ratio, checkpoint=FIXTURE, output=out,
                                    calib_data=FIXTURE / "calib.txt", num_samples=8, seq_len=128, dtype="float32",
                                    options=options))
    cfg, counts = verify_checkpoint(out)
    assert abs(counts.achieved_ratio - ratio) <= 0.005
    assert abs(report["achieved_ratio"] - counts.achieved_ratio) < 1e-9
    return cfg, report


def test_partition_meets_ratio_at_fixture_size():
    """E = 16, n = m = 192, four layers with an MI-like budget profile: ±0.005 at every ratio of the table."""
    E_, n, m = 16, 192, 192
    full = 3 * E_ * n * m
    g = torch.Generator().manual_seed(3)
    for ratio in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
        saves = qp_save_ratios([0.3, 0.9, 0.5, 1.2], 1 - ratio)
        kept = sum(partition(torch.rand(E_, m, generator=g) ** 4, int(s * full), n, 0.8, 0.1, True).cost()
                   for s in saves)
        assert abs((1 - kept / (4 * full)) - ratio) <= 0.005


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="fixture checkpoint missing")
@pytest.mark.parametrize("ratio", [0.8])
def test_fixture_default_meets_ratio(tmp_path, ratio):
    cfg, report = _convert(tmp_path, ratio, FAST_MINE)
    assert report["calibration"]["plan"]
    saves = [report["layers"][str(l)]["save_ratio"] for l in cfg.moe_layers]
    assert abs(sum(saves) / len(saves) - (1 - ratio)) < 1e-6
    for l in cfg.moe_layers:
        spec, rep = cfg.layers[l], report["layers"][str(l)]
        choice = rep["held_out_choice"]  # the split with the lowest held-out error, per-expert SVD among them
        assert choice["rms_dy"][choice["split"]] == min(choice["rms_dy"].values())
        assert (spec.units is None) == (choice["split"] == "svd")
        assert rep["output_rel_err"] < 1.0


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="fixture checkpoint missing")
def test_fixture_ablations_meet_ratio(tmp_path):
    cfg, report = _convert(tmp_path, 0.2, ["budget=uniform", "score=magnitude", "base=none"])
    assert all(cfg.layers[l].down.base is None for l in cfg.moe_layers)
    assert not report["calibration"]["plan"]
