"""rfid-moe: exact ratios on the fixture, feasibility limits, the allocation, and the factorizations' properties."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch
from method_fakes import ARCH, CALIB, fake_calib, fake_weights, make_method
from model_factory import FIXTURE

from vllm_moe_lowrank.converters import cli
from vllm_moe_lowrank.converters.checkpoint import Checkpoint
from vllm_moe_lowrank.converters.errors import ConvertError, RatioError
from vllm_moe_lowrank.converters.layer_fit import cast_layer
from vllm_moe_lowrank.converters.methods.rfid_moe import (TypeCurve, allocate_ranks, effective_rank, energy_buckets,
                                                  frequency_groups, importance, least_squares_left,
                                                  random_buckets, shared_left_factor, shared_right_factor,
                                                  split_budget)
from vllm_moe_lowrank.converters.verify import verify_checkpoint
from vllm_moe_lowrank.format import FORMAT_VERSION, PROJS, MoELowRankConfig, bucket_projection
from vllm_moe_lowrank.materialize import materialize_projection

SMALL = dataclasses.replace(ARCH, num_experts=8, hidden_size=32, intermediate_size=24, moe_layers=(0, 1))


def method(ratio: float, *options: str, arch=ARCH):
    return make_method("rfid-moe", ratio, options, arch)


RFID_ONLY = ("fallback=false", "xi_select=calib")  # the method's own fit, no held-out choice (tested on its own)




def kept_params(arch, comp) -> int:
    """Floats the format stores for a compressed layer (what verify_checkpoint counts)."""
    cfg = MoELowRankConfig(format_version=FORMAT_VERSION, method="rfid-moe", num_experts=arch.num_experts,
                           hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                           moe_prefix=arch.moe_prefix, moe_layers=list(arch.moe_layers), layers={0: comp.spec})
    return sum(math.prod(t.shape) for t in cfg.tensor_specs(0).values() if t.is_param)


def whitened_err(W: torch.Tensor, approx: torch.Tensor, G: torch.Tensor) -> float:
    D = W - approx
    return float(torch.einsum("ij,jk,ik->", D, G, D))


def spd(n: int, g: torch.Generator) -> torch.Tensor:
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64) @ torch.diag(torch.rand(n, generator=g,
                                                                                         dtype=torch.float64) + 0.1)
    return X.T @ X


# ----- allocation (§3.1–3.3) ---------------------------------------------------------------------------------
def test_groups_are_consecutive_in_routing_frequency_order():
    freq = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.0, 0.3, 0.7])
    assert frequency_groups(freq, 3) == [[1, 6, 2], [3, 5, 0], [4]]  # ties by expert id, last group ragged


def test_effective_rank_spans_one_to_full():
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(17)) == pytest.approx(17.0)
    # Roy & Vetterli: entropy of σ/Σσ (not of σ²)
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum()
    assert effective_rank(s) == pytest.approx(math.exp(-float((p * p.log()).sum())))


def test_fused_importance_and_its_ablations():
    erank, freq = [10.0, 30.0], [3.0, 1.0]
    assert importance(erank, freq, "fused", 0.8, "sum") == pytest.approx([0.8 * 0.25 + 0.2 * 0.75,
                                                                           0.8 * 0.75 + 0.2 * 0.25])
    assert importance(erank, freq, "frequency", 0.8, "sum") == pytest.approx([0.75, 0.25])
    assert importance(erank, freq, "erank", 0.3, "sum") == pytest.approx([0.25, 0.75])
    assert importance(erank, freq, "uniform", 0.8, "sum") == [1.0, 1.0]
    assert importance([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], "fused", 0.5, "minmax") == pytest.approx([0.5, 0.75, 1.0])


def test_rank_allocation_is_proportional_and_fills_the_exact_budget():
    rng = random.Random(0)
    for _ in range(300):
        G = rng.randint(1, 12)
        w = [rng.random() ** 3 for _ in range(G)]
        cost = [rng.choice([960, 768, 1200]) for _ in range(G)]
        cap = [rng.randint(1, 200) for _ in range(G)]
        budget = rng.randint(sum(cost), sum(c * k for c, k in zip(cost, cap)) + 5000)
        ranks = allocate_ranks(w, cost, cap, budget)
        spent = sum(c * k for c, k in zip(cost, ranks))
        assert spent <= budget and all(1 <= k <= c for k, c in zip(ranks, cap))
        assert all(k == cp or budget - spent < c for k, cp, c in zip(ranks, cap, cost))  # nothing affordable left
    assert allocate_ranks([1.0, 2.0, 1.0], [10, 10, 10], [100] * 3, 400) == [10, 20, 10]
    assert allocate_ranks([0.0, 1.0], [10, 10], [5, 100], 300) == [1, 29]  # rank >= 1 even at zero importance
    with pytest.raises(ValueError):
        allocate_ranks([1.0, 1.0], [10, 10], [5, 5], 19)


def test_budget_split_goes_to_the_type_whose_error_falls_fastest():
    flat = TypeCurve(weight=[1.0], cost=[10], cap=[50], fixed=0, eig=[torch.ones(50, dtype=torch.float64)])
    steep = TypeCurve(weight=[1.0], cost=[10], cap=[50], fixed=0,
                      eig=[torch.tensor([100.0] * 5 + [0.01] * 45, dtype=torch.float64)])
    budgets = split_budget(600, {"a": flat, "b": steep}, steps=60)
    assert sum(budgets.values()) == 600
    assert budgets["b"] >= 50 and steep.error(budgets["b"]) < 1e-3  # the steep spectrum gets its 5 ranks first
    assert budgets["a"] == 600 - budgets["b"]


# ----- factorizations ----------------------------------------------------------------------------------------
def test_shared_right_factor_is_eckart_young_on_the_whitened_stack():
    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(12, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    G = spd(16, g)
    for refit in (False, True):  # one Gram for all: the truncated SVD of [W_e·S] is optimal, refit or not
        fit = shared_right_factor(Ws, [G, G, G], 5, refit)
        err = sum(whitened_err(W, A @ fit.B, G) for W, A in zip(Ws, fit.A))
        S = torch.linalg.cholesky(3 * G)
        sigma = torch.linalg.svdvals(torch.cat([W @ S for W in Ws]))
        assert err == pytest.approx(float((sigma[5:] ** 2).sum()) / 3, rel=1e-8)
    full = shared_right_factor(Ws, [G, G, G], 16, True)
    assert all(torch.allclose(A @ full.B, W, atol=1e-8) for W, A in zip(Ws, full.A))


def test_refit_with_each_experts_own_gram_never_hurts():
    g = torch.Generator().manual_seed(1)
    Ws = [torch.randn(12, 16, generator=g, dtype=torch.float64) for _ in range(4)]
    grams = [spd(16, g) * (10 ** i) for i in range(4)]  # very different input scales, like rare vs busy experts
    plain, refit = (shared_right_factor(Ws, grams, 6, r) for r in (False, True))
    for W, A0, A1, G in zip(Ws, plain.A, refit.A, grams):
        assert whitened_err(W, A1 @ refit.B, G) <= whitened_err(W, A0 @ plain.B, G) * (1 + 1e-10)


def test_down_output_basis_is_optimal_under_per_expert_whitening():
    g = torch.Generator().manual_seed(2)
    Ws = [torch.randn(16, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = [spd(10, g) for _ in range(3)]
    U, Vs = shared_left_factor(Ws, grams, 7)
    assert torch.allclose(U.T @ U, torch.eye(7, dtype=torch.float64), atol=1e-10)
    err = sum(whitened_err(W, U @ V, G) for W, V, G in zip(Ws, Vs, grams))
    sigma = torch.linalg.svdvals(torch.cat([W @ torch.linalg.cholesky(G) for W, G in zip(Ws, grams)], dim=1))
    assert err == pytest.approx(float((sigma[7:] ** 2).sum()), rel=1e-8)


def test_residual_projection_is_orthonormal_and_eta_is_least_squares():
    g = torch.Generator().manual_seed(3)
    n, s = 20, 5
    bucket = random_buckets(n, s, g)
    assert sorted(torch.bincount(bucket.long(), minlength=s).tolist()) == [4] * 5  # balanced
    P = bucket_projection(bucket, s)  # [n, s]
    assert torch.allclose(P.T @ P, torch.eye(s, dtype=torch.float64))
    Ws = [torch.randn(8, n, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [spd(n, g) for _ in range(2)]
    fit = shared_right_factor(Ws, grams, 4, True, P)
    for W, A, eta, G in zip(Ws, fit.A, fit.eta, grams):  # normal equations of [A, η] on the basis [B; Pᵀ]
        R = W - A @ fit.B - eta @ P.T
        assert torch.allclose(R @ G @ torch.cat([fit.B, P.T]).T, torch.zeros(8, 4 + s, dtype=torch.float64),
                              atol=1e-8 * float(W.norm() * G.norm()))
    seq = shared_right_factor(Ws, grams, 4, False, P)  # sequential: η fitted to what A·B leaves
    assert torch.allclose(seq.eta[0], least_squares_left(Ws[0] - seq.A[0] @ seq.B, P.T, grams[0]))


def test_energy_buckets_single_out_the_channels_carrying_the_residual():
    g = torch.Generator().manual_seed(4)
    n = 30
    G = torch.eye(n, dtype=torch.float64)
    R = torch.randn(6, n, generator=g, dtype=torch.float64) * 0.01
    R[:, 7] += 5.0
    R[:, 21] += 3.0
    bucket = energy_buckets([(R, G), (R * 0.5, G)], 3, n)
    assert bucket[7] == 0 and bucket[21] == 1 and int((bucket == 2).sum()) == n - 2  # + one catch-all bucket


# ----- the method ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6, 0.8])
def test_layer_keeps_the_exact_budget_at_every_ratio(ratio):
    arch = dataclasses.replace(ARCH, num_experts=8, moe_layers=(0,))
    m = method(ratio, *RFID_ONLY, arch=arch)
    comp = m.compress_layer(0, fake_weights(8, 192, 192), fake_calib(8, 192, T=1500, outlier=True))
    D = 3 * 8 * 192 * 192
    assert abs((1 - kept_params(arch, comp) / D) - ratio) <= 0.005
    assert kept_params(arch, comp) <= math.floor((1 - ratio) * D)
    cast_layer(arch, "rfid-moe", 0, comp, torch.float32)  # names and shapes agree with the format
    assert comp.info["down"] == ("lowrank" if comp.spec.down.lowrank else "dense")


ABLATIONS = [["allocation=uniform"], ["allocation=frequency"], ["allocation=erank"], ["residual=false"],
             ["buckets=random"], ["whiten=false"], ["refit=false"], ["down=dense"], ["down=lowrank"],
             ["split=equal"], ["erank_on=whitened"], ["norm=minmax", "xi_select=fixed", "xi=0.3"], ["group_size=3"]]


@pytest.mark.parametrize("options", ABLATIONS, ids=lambda o: ",".join(o))
def test_ablation_options_parse_and_run(options):
    m = method(0.4, *RFID_ONLY, *options, arch=SMALL)
    w, calib = fake_weights(8, 32, 24), fake_calib(8, 32, T=2000, outlier=True)
    comp = m.compress_layer(0, w, calib)
    tensors = cast_layer(SMALL, "rfid-moe", 0, comp, torch.float32)
    budget, kept = math.floor(0.6 * 3 * 8 * 32 * 24), kept_params(SMALL, comp)
    k = 3 if "group_size=3" in options else 4
    assert 0 <= budget - kept < 3 * (k * 24 + 32)  # less than one group rank left over per projection type
    gate = comp.spec.gate
    assert (gate.residual is None) == ("residual=false" in options)
    assert gate.lowrank.right_groups == comp.spec.up.lowrank.right_groups
    if "down=dense" in options:
        assert comp.spec.down.dense is not None
    if "down=lowrank" in options:
        assert comp.spec.down.lowrank.left_slots == gate.lowrank.right_groups
    if "allocation=uniform" in options:
        assert len(set(gate.lowrank.group_ranks())) <= 2  # equal up to the single-rank top-up
    cfg = MoELowRankConfig(format_version=FORMAT_VERSION, method="rfid-moe", num_experts=8, hidden_size=32,
                           intermediate_size=24, moe_prefix=SMALL.moe_prefix, moe_layers=[0], layers={0: comp.spec})
    # what is written reconstructs the reported whitened errors' weights: a sane approximation of every expert
    for p in ("gate", "up"):  # down is refitted on ĥ (--down-fit compressed): judged by the output below
        W = w.proj(p).double()
        What = torch.stack([materialize_projection(cfg, 0, p, e, tensors.__getitem__) for e in range(8)])
        assert float((W - What).norm() / W.norm()) < 0.9, p
    from vllm_moe_lowrank.converters.calibration import dense_expert_fn, moe_output
    from vllm_moe_lowrank.converters.layer_fit import written_expert_fn

    exact = moe_output(calib.x, calib.topk_ids, calib.topk_weights, dense_expert_fn(w.gate, w.up, w.down))
    approx = moe_output(calib.x, calib.topk_ids, calib.topk_weights,
                        written_expert_fn(SMALL, "rfid-moe", 0, comp, tensors))
    assert float((approx - exact).norm() / exact.norm()) < 0.9


def test_xi_is_chosen_on_calibration_statistics():
    """xi_select=calib takes the ξ of XI_GRID whose plan the calibration spectra predict best; the layer
    then equals a fixed-ξ run with that value. Nothing but the calibration collector is read."""
    from vllm_moe_lowrank.converters.methods.rfid_moe import XI_GRID

    w, calib = fake_weights(8, 32, 24), fake_calib(8, 32, T=2000, outlier=True)
    auto = method(0.5, *RFID_ONLY, arch=SMALL).compress_layer(0, w, calib)
    assert auto.info["xi"] in XI_GRID
    fixed = {xi: method(0.5, "fallback=false", "xi_select=fixed", f"xi={xi}", arch=SMALL).compress_layer(0, w, calib)
             for xi in XI_GRID}
    assert fixed[auto.info["xi"]].info["group_ranks"] == auto.info["group_ranks"]
    best = min(XI_GRID, key=lambda xi: (sum(v ** 2 for v in fixed[xi].info["predicted_rel_err"].values()), xi))
    assert auto.info["xi"] == best


def test_held_out_choice_of_xi_and_of_per_expert_svd():
    """Default: every ξ plan and per-expert SVD at the same budget are fitted on the first 3/4 of the calibration
    tokens and scored on the held-out quarter (``holdout_split``); the best ξ is refitted on every token, and kept
    only if it beats per-expert SVD clearly (``clearly_lower``), else the layer is per-expert SVD."""
    from vllm_moe_lowrank.converters.calibration import clearly_lower, routed_output_sq_error

    w, calib = fake_weights(8, 32, 24), fake_calib(8, 32, T=1024, outlier=True)
    comp = method(0.5, arch=SMALL).compress_layer(0, w, calib)
    info = comp.info["held_out_choice"]
    fit, held = calib.holdout_split()
    scored = {float(k[3:-7]): v for k, v in info.items() if k.startswith("xi_")}
    assert info["xi"] == min(scored, key=lambda x: (scored[x], x)) and len(scored) >= 1
    alone = method(0.5, "fallback=false", "xi_select=fixed", f"xi={info['xi']}", arch=SMALL)
    dy2 = routed_output_sq_error(SMALL, 0, alone.compress_layer(0, w, fit), w, held)  # the chosen ξ, fitted on 3/4
    assert scored[info["xi"]] == pytest.approx(float(dy2.mean()) ** 0.5, rel=1e-5)
    from vllm_moe_lowrank.converters.methods.moe_svd_fit import _GramCache, per_expert_svd

    svd = per_expert_svd("rfid-moe", 0, w, fit, _GramCache(w, fit, 1e-4, 0.1, torch.device("cpu")),
                         math.floor(0.5 * 3 * 8 * 32 * 24), 1e-4, 0.1, torch.float32)
    svd_dy2 = routed_output_sq_error(SMALL, 0, svd, w, held)
    assert info["per_expert_svd_rms_dy"] == pytest.approx(float(svd_dy2.mean()) ** 0.5, rel=1e-5)
    assert info["rfid"] == clearly_lower(dy2, svd_dy2)
    if info["rfid"]:
        refit = alone.compress_layer(0, w, calib).tensors
        assert all(torch.equal(comp.tensors[k], refit[k]) for k in refit)
    else:
        assert comp.spec.gate.lowrank.right_groups is None and comp.spec.gate.residual is None
    assert clearly_lower(torch.zeros(512), torch.ones(512)) and not clearly_lower(torch.ones(512), torch.zeros(512))


def test_bad_options_are_refused_with_the_valid_ones_listed():
    with pytest.raises(ConvertError, match="allocation"):
        method(0.4, "allocation=magic")
    with pytest.raises(ConvertError, match="Valid options: group_size"):
        method(0.4, "nope=1")


def test_infeasible_ratios_are_refused_up_front_with_the_limit():
    method(0.8).check_feasible()  # down is compressed too beyond the paper's cap (measured extension)
    with pytest.raises(RatioError, match=r"down dense: ratios .*\.\. 0\.6[0-9]+.*caps the ratio below 2/3"):
        method(0.7, "down=dense").check_feasible()
    with pytest.raises(RatioError, match=r"down low-rank: ratios .*\.\. 0\.9[0-9]+.*residual=false"):
        method(0.99).check_feasible()
    plan = method(0.3).dry_run()
    assert len(plan) == 4 and plan[0]["groups"] == 4 and plan[0]["residual_width"] == 6


def test_layers_are_deterministic_and_independent_of_order():
    m = method(0.5, "buckets=random", *RFID_ONLY, arch=SMALL)
    w, calib = fake_weights(8, 32, 24), fake_calib(8, 32, T=2000, outlier=True)
    first = m.compress_layer(1, w, calib).tensors
    m.compress_layer(0, fake_weights(8, 32, 24, seed=5), fake_calib(8, 32, T=2000, seed=6, outlier=True))
    again = method(0.5, "buckets=random", *RFID_ONLY, arch=SMALL).compress_layer(1, w, calib).tensors
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert m.compress_layer(1, w, calib).tensors.keys() == first.keys()


# ----- on the fixture ------------------------------------------------------------------------------------------
RATIO = 0.8  # one conversion (CI time): every term is written (down low-rank in all layers, residual on gate/up)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rfid") / f"rfid-{RATIO}"
    # a fixed ξ < 1 and no fallback: the tests below check rfid's own terms (held-out choice: its own test)
    cli.main(["--method", "rfid-moe", "--ratio", str(RATIO), str(FIXTURE), str(folder), *CALIB, "--dtype", "float32",
              "-o", "xi_select=fixed", "-o", "fallback=false"])
    return folder


def test_fixture_achieved_ratio_recounted_from_written_tensors(converted):
    cfg, counts = verify_checkpoint(converted)
    assert abs(counts.achieved_ratio - RATIO) <= 0.005
    report = json.loads((converted / "moe_lowrank_report.json").read_text())
    assert report["achieved_ratio"] == pytest.approx(counts.achieved_ratio, abs=1e-9)
    assert counts.index_bytes == 4 * 2 * 4 * 192 * len(cfg.layers)  # res_bucket [G=4, n] int32 of gate and up
    for layer, spec in cfg.layers.items():
        lr = spec.gate.lowrank
        assert lr.right_groups is not None and len(lr.group_ranks()) == 4  # groups of k = 4 of 16 experts
        assert spec.gate.residual.width == 6 and spec.gate.residual.groups == lr.right_groups
        entry = report["layers"][str(layer)]
        assert entry["down"] == "lowrank" and spec.down.lowrank.left_slots == lr.right_groups  # dense is infeasible
        assert entry["output_rel_err"] < 0.8


def test_fixture_gate_and_up_share_buckets_and_frequent_groups_get_more_rank(converted):
    cfg, _ = verify_checkpoint(converted)
    ckpt = Checkpoint(converted)
    for layer in cfg.layers:
        gate = ckpt.get(cfg.tensor_name(layer, "gate", "res_bucket", None))
        assert torch.equal(gate, ckpt.get(cfg.tensor_name(layer, "up", "res_bucket", None)))
    report = json.loads((converted / "moe_lowrank_report.json").read_text())
    skewed = report["layers"]["1"]  # layer 1 routes very unevenly on the fixture
    ranks = skewed["group_ranks"]["gate"]
    assert skewed["group_frequency"] == sorted(skewed["group_frequency"], reverse=True)
    assert ranks[0] > ranks[-1]
