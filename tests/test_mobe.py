"""mobe: exact ratios on the fixture, feasibility limits, and the defining properties of the basis fit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from method_fakes import ARCH, CALIB, make_method
from model_factory import FIXTURE

from vllm_moe_lowrank.converters import cli
from vllm_moe_lowrank.converters.calibration import LayerCalibration
from vllm_moe_lowrank.converters.checkpoint import Checkpoint
from vllm_moe_lowrank.converters.errors import ConvertError, RatioError
from vllm_moe_lowrank.converters.experts import ExpertWeights, load_expert_weights
from vllm_moe_lowrank.converters.methods.mobe import (MoBESettings, _Loss, balanced_groups, fit_bases, grouped_svd_bases,
                                              init_fit, solve_left, split_budget)
from vllm_moe_lowrank.converters.verify import verify_checkpoint
from vllm_moe_lowrank.format import (FORMAT_VERSION, PROJS, Act, DenseTerm, LayerSpec, LowRankTerm, MoELowRankConfig,
                                     ProjSpec, count_params)
from vllm_moe_lowrank.materialize import materialize_projection

E, N, M = 16, 192, 192
D = 3 * E * N * M  # dense params of one fixture MoE layer
FAST = ["-o", "steps=20", "-o", "eval_every=5"]  # real fits, few steps: the tests check wiring and math


def method(ratio: float, *options: str, arch=ARCH):
    return make_method("mobe", ratio, options, arch)


def layer_config(comp, layer: int = 0) -> MoELowRankConfig:
    return MoELowRankConfig(format_version=FORMAT_VERSION, method="mobe", num_experts=E, hidden_size=N,
                            intermediate_size=M, moe_prefix="model.layers.{layer}.mlp.experts", moe_layers=[layer],
                            layers={layer: comp.spec})


def named(cfg: MoELowRankConfig, layer: int, comp) -> dict[str, torch.Tensor]:
    return {cfg.tensor_name(layer, p, s, e): t for (p, s, e), t in comp.tensors.items()}


@pytest.fixture(scope="module")
def fixture_layer() -> ExpertWeights:
    return load_expert_weights(Checkpoint(FIXTURE), ARCH, 1)


# ----- ratio → (J, r): exact accounting ---------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.66, 0.7, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("down", ["auto", "basis"])
def test_planned_shapes_count_exactly_and_meet_the_ratio(ratio, down):
    """The planned shapes' parameter count equals the format's tensor count and lands within 0.005 of the ratio
    without exceeding the layer budget."""
    m = method(ratio, f"down={down}")
    with_down, shapes = m.plan()
    kept = sum(s.params for s in shapes.values()) + (0 if with_down else E * N * M)
    assert kept <= math.floor((1 - ratio) * D)
    assert abs((1 - kept / D) - ratio) <= 0.005
    for p, s in shapes.items():
        assert count_params({"x": (s.experts, s.out, s.rank), "v": (s.num_bases * s.rank, s.inp),
                             "mix": (s.experts, s.num_bases)}) == s.params
        assert (s.out, s.inp) == ((N, M) if p == "down" else (M, N))
        assert 1 <= s.rank <= min(s.out, s.inp)


def test_default_bases_follow_experts_per_basis_and_rank_caps_buy_bases():
    assert {s.num_bases for s in method(0.3).plan()[1].values()} == {4}  # E / 4, the paper's E/J
    assert {s.num_bases for s in method(0.3, "experts_per_basis=2").plan()[1].values()} == {8}
    assert {s.num_bases for s in method(0.3, "num_bases=3").plan()[1].values()} == {3}
    # a budget that allows more than rank min(out, in): rank stays at the cap, the rest buys bases (paper: r = m)
    big = split_budget(2 * (E * 64 * 64 + 40 * 64 * 128 + E * 40), E, {"gate": (64, 128), "up": (64, 128)}, 4)
    assert all(s.rank == 64 and s.num_bases >= 39 for s in big.values())


def test_auto_keeps_down_dense_up_to_a_third_then_fits_it():
    assert method(0.3).plan()[0] is False and method(1 / 3).plan()[0] is False
    assert method(0.34).plan()[0] is True and method(0.8).plan()[0] is True
    assert method(0.6, "down=dense").plan()[0] is False
    assert method(0.2, "down=basis").plan()[0] is True


# ----- feasibility: refused up front with the limit stated ------------------------------------------------------
def test_ratio_beyond_gate_up_refused_with_down_dense():
    with pytest.raises(RatioError, match=r"at most 0\.6630.*down=basis \(limit 0\.99"):
        method(0.7, "down=dense").check_feasible()


def test_ratio_beyond_everything_refused():
    with pytest.raises(RatioError, match=r"largest feasible ratio is 0\.99"):
        method(0.998).check_feasible()


def test_cli_refuses_before_reading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--method", "mobe", "--ratio", "0.7", "-o", "down=dense", str(FIXTURE), str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "0.6630" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_options_parse_and_bad_ones_list_the_valid_keys():
    s = method(0.3, "act=identity", "steps=7", "down=basis", "activation_aware=true").settings
    assert (s.act, s.steps, s.down, s.activation_aware) == (Act.identity, 7, "basis", True)
    assert method(0.3, "activation_aware=true").needs_calibration and not method(0.3).needs_calibration
    with pytest.raises(ConvertError, match="experts_per_basis"):
        method(0.3, "bases=3")
    with pytest.raises(ConvertError, match="act"):
        method(0.3, "act=relu")
    for bad in ("steps=-1", "init_mix=1", "eval_every=0", "experts_per_basis=0"):
        with pytest.raises(ConvertError, match=bad.split("=")[0]):
            method(0.3, bad)


# ----- the math -----------------------------------------------------------------------------------------------
def test_solve_left_is_the_exact_minimizer_for_plain_and_gram_losses():
    g = torch.Generator().manual_seed(0)
    Z, R = torch.randn(3, 12, 10, generator=g), torch.randn(3, 4, 10, generator=g)
    X = torch.randn(3, 50, 10, generator=g)
    for gram in (None, X.transpose(1, 2) @ X):
        A = solve_left(Z, R, gram, ridge=0.0)
        loss = _Loss(Z, gram)
        best = float(loss(A @ R, slice(None)))
        for _ in range(5):
            assert float(loss((A + 1e-2 * torch.randn(A.shape, generator=g)) @ R, slice(None))) > best


def test_gram_loss_is_the_output_error_on_the_calibration_inputs():
    g = torch.Generator().manual_seed(1)
    Z, W_hat = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    X = torch.randn(2, 40, 5, generator=g)  # [E, tokens, in]
    loss = _Loss(Z, X.transpose(1, 2) @ X)
    out_err = ((W_hat - Z) @ X.transpose(1, 2)).square().sum() / (Z @ X.transpose(1, 2)).square().sum()
    assert float(loss(W_hat, slice(None))) == pytest.approx(float(out_err), rel=1e-5)


def test_grouped_svd_init_is_exact_when_each_group_shares_a_rank_r_row_space():
    """Experts of group j = X_e·V_j: the grouped SVD recovers V_j, and with a (nearly) one-hot mix, identity f and
    the closed-form A the initialization reconstructs every expert."""
    g = torch.Generator().manual_seed(2)
    J, r, n, out = 3, 4, 20, 8
    groups = balanced_groups(7, J)
    assert groups.tolist() == [0, 0, 0, 1, 1, 2, 2]
    V = torch.linalg.qr(torch.randn(n, J * r, generator=g))[0].T.reshape(J, r, n)
    Z = torch.stack([torch.randn(out, r, generator=g) @ V[int(j)] for j in groups])  # [7, out, n]
    B = grouped_svd_bases(Z, groups, J, r)
    for j in range(J):  # same row space: projecting V_j onto B_j loses nothing
        assert torch.allclose(V[j] @ B[j].T @ B[j], V[j], atol=1e-5)
    fit = init_fit(Z, J, r, Act.identity, None, MoBESettings(init_mix=1 - 1e-7))
    assert float(_Loss(Z, None)(fit.A @ fit.right(), slice(None))) < 1e-8


def test_fit_improves_tracks_the_best_state_and_exports_the_format(fixture_layer):
    """Adam lowers the loss from the grouped-SVD start; the written tensors (σ folded into lr_u, softmaxed mix,
    stacked bases) materialize through the format to exactly the fitted Ŵ_e; mixes are points of the simplex."""
    s = MoBESettings(steps=40, eval_every=10)
    fit = fit_bases(fixture_layer.gate, 4, 30, Act.silu, s)
    info = fit.info
    assert info["loss"] <= info["adam_loss"] <= info["init_loss"] and info["loss"] < 0.97 * info["init_loss"]
    assert min(c[1] for c in info["loss_curve"]) == pytest.approx(info["adam_loss"], rel=1e-5)
    assert [c[0] for c in info["loss_curve"]] == [0, 10, 20, 30, 40] and info["fit_s"] > 0
    U, V, mix = fit.tensors()
    assert U.shape == (E, M, 30) and V.shape == (4 * 30, N) and mix.shape == (E, 4)
    assert torch.all(mix >= 0) and torch.allclose(mix.sum(1), torch.ones(E))
    lr = LowRankTerm(ranks=[30] * E, num_bases=4, act="silu")
    cfg = MoELowRankConfig(format_version=FORMAT_VERSION, method="mobe", num_experts=E, hidden_size=N,
                           intermediate_size=M, moe_prefix="m.{layer}", moe_layers=[0], layers={0: LayerSpec(
                               method="mobe", gate=ProjSpec(lowrank=lr), up=ProjSpec(lowrank=lr),
                               down=ProjSpec(dense=DenseTerm()))})
    store = {cfg.tensor_name(0, "gate", "lr_v", None): V}
    for e in range(E):
        store[cfg.tensor_name(0, "gate", "lr_u", e)] = U[e]
        store[cfg.tensor_name(0, "gate", "lr_mix", e)] = mix[e]
    W_hat = fit.weights().detach().double()
    for e in (0, 7, 15):
        assert torch.allclose(materialize_projection(cfg, 0, "gate", e, store.__getitem__), W_hat[e], atol=1e-5)
    rel = float((fixture_layer.gate.double() - W_hat).square().sum() / fixture_layer.gate.double().square().sum())
    assert rel == pytest.approx(info["loss"], rel=1e-3)  # the loss is the relative squared weight error


def test_early_stopping_and_batched_gradients(fixture_layer):
    W = fixture_layer.up[:8]
    stop = fit_bases(W, 2, 8, Act.tanh, MoBESettings(steps=400, eval_every=5, patience=10, min_delta=0.5))
    assert stop.info["steps"] < 400  # nothing gains 50 % in 10 steps
    full = fit_bases(W, 2, 8, Act.tanh, MoBESettings(steps=5, eval_every=1))
    chunked = fit_bases(W, 2, 8, Act.tanh, MoBESettings(steps=5, eval_every=1, batch_experts=3))
    assert chunked.info["loss"] == pytest.approx(full.info["loss"], rel=1e-4)  # accumulated = full-batch gradient


def test_best_state_is_the_parameters_its_loss_was_measured_on(fixture_layer):
    """The kept state's loss, recomputed from the returned parameters, is the recorded best loss (the bug kept the
    post-step parameters under the pre-step loss); a large step makes consecutive states differ."""
    fit = fit_bases(fixture_layer.up[:8], 2, 8, Act.silu, MoBESettings(steps=25, eval_every=1, lr=0.5,
                                                                         refit_left=False))
    rel = float((fixture_layer.up[:8].double() - fit.weights().detach().double()).square().sum()
                / fixture_layer.up[:8].double().square().sum())
    assert fit.info["best_step"] > 0 and rel == pytest.approx(fit.info["adam_loss"], rel=1e-4)


def test_fit_length_follows_the_device_and_activation_awareness_the_data():
    from vllm_moe_lowrank.converters.method import MethodContext, build_method
    from vllm_moe_lowrank.converters.methods.mobe import GPU_FIT

    def settings(device, ratio, calib, *opts):
        ctx = MethodContext(arch=ARCH, ratio=ratio, device=torch.device(device), load_experts=None,
                            has_calib_data=calib)
        return build_method("mobe", ctx, list(opts)).settings

    gpu = settings("cuda", 0.5, False)
    assert (gpu.steps, gpu.eval_every, gpu.patience) == (GPU_FIT["steps"], GPU_FIT["eval_every"],
                                                         GPU_FIT["patience"]) == (10000, 200, 2000)
    assert settings("cuda", 0.5, False, "steps=50").steps == 50  # given options win
    cpu = settings("cpu", 0.5, False)
    assert (cpu.steps, cpu.eval_every, cpu.patience) == (500, 50, 500)
    assert settings("cpu", 0.5, True).activation_aware and not settings("cpu", 0.5, False).activation_aware
    assert settings("cpu", 0.3, True).activation_aware  # at every ratio when calibration data is given
    assert not settings("cpu", 0.5, True, "activation_aware=false").activation_aware


def test_aware_down_is_refitted_on_the_fitted_gate_up(fixture_layer):
    """At a ratio with down=basis, the aware fit's down target is W* of calibration.down_target (not W_d); with
    down dense (ratio <= 1/3, aware forced on) the written down is that full-rank refit."""
    g = torch.Generator().manual_seed(4)
    T, k = 1500, 4
    x = torch.randn(T, N, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    calib = LayerCalibration(x=x, topk_ids=ids, topk_weights=torch.full((T, k), 1 / k), num_experts=E)
    m = method(0.3, "steps=5", "eval_every=5", "activation_aware=true")
    comp = m.compress_layer(1, fixture_layer, calib)
    U = {p: torch.stack([comp.tensors[p, "lr_u", e] for e in range(E)]) for p in ("gate", "up")}
    assert comp.spec.down.dense is not None
    d = comp.tensors["down", "weight", 3].double()
    assert not torch.allclose(d, fixture_layer.down[3].double())
    cfg = layer_config(comp, 1)
    store = named(cfg, 1, comp)
    gate, up = (materialize_projection(cfg, 1, p, 3, store.__getitem__) for p in ("gate", "up"))
    W_star, _ = calib.down_target(3, fixture_layer, gate, up)
    torch.testing.assert_close(d, W_star, rtol=1e-4, atol=1e-5)
    assert U["gate"].shape[0] == E


# ----- the method on the fixture ------------------------------------------------------------------------------
def test_compress_layer_is_deterministic_and_keeps_down_exact(fixture_layer):
    m = method(0.3, "steps=15", "eval_every=5")
    a, b = m.compress_layer(1, fixture_layer, None), m.compress_layer(1, fixture_layer, None)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    for e in range(E):
        assert torch.equal(a.tensors["down", "weight", e], fixture_layer.down[e].float())
    assert a.spec.down.dense is not None and a.spec.gate.lowrank.num_bases == 4
    assert set(a.info) == {"down_mode", "gate", "up"} and a.info["down_mode"] == "dense"
    for p in ("gate", "up"):
        assert {"loss_curve", "fit_s", "num_bases", "rank", "loss"} <= set(a.info[p])
    cfg = layer_config(a, 1)
    assert set(named(cfg, 1, a)) == set(cfg.tensor_specs(1))  # exactly the format's tensors
    assert count_params({k: tuple(t.shape) for k, t in named(cfg, 1, a).items()}) == sum(
        s.params for s in m.plan()[1].values()) + E * N * M


def test_activation_aware_weights_the_error_by_each_experts_inputs(fixture_layer):
    """With per-expert Grams the aware fit has a lower output error on those inputs than the plain fit (and the
    plain fit a lower weight error)."""
    g = torch.Generator().manual_seed(3)
    T, k = 2000, 4
    x = torch.randn(T, N, generator=g) * torch.linspace(0.05, 3, N)  # strongly anisotropic inputs
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    calib = LayerCalibration(x=x, topk_ids=ids, topk_weights=torch.full((T, k), 1 / k), num_experts=E)
    plain = method(0.4, "steps=30", "eval_every=10")
    aware = method(0.4, "steps=30", "eval_every=10", "activation_aware=true")
    grams = aware._grams("gate", fixture_layer, calib)
    assert grams.shape == (E, N, N)
    fits = {name: fit_bases(fixture_layer.gate, 4, 40, Act.silu, m.settings, gram)
            for name, m, gram in (("plain", plain, None), ("aware", aware, grams))}
    out_err = {k: float(_Loss(fixture_layer.gate.float(), grams)(f.weights(), slice(None))) for k, f in fits.items()}
    w_err = {k: float(_Loss(fixture_layer.gate.float(), None)(f.weights(), slice(None))) for k, f in fits.items()}
    assert out_err["aware"] < out_err["plain"] and w_err["plain"] < w_err["aware"]
    comp = aware.compress_layer(1, fixture_layer, calib)
    assert comp.info["gate"]["loss"] < comp.info["gate"]["init_loss"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("mobe")
    out = {}
    for name, ratio, extra in (("auto", 0.3, []), ("basis", 0.8, ["-o", "down=basis", "-o", "act=tanh", "-o", "activation_aware=false"])):
        cli.main(["--method", "mobe", "--ratio", str(ratio), str(FIXTURE), str(root / name), *CALIB, "--dtype",
                  "float32", *FAST, *extra])
        out[name] = (root / name, ratio)
    return out


@pytest.mark.parametrize("name", ["auto", "basis"])
def test_achieved_ratio_recounted_from_written_tensors(converted, name):
    folder, ratio = converted[name]
    cfg, counts = verify_checkpoint(folder)
    report = json.loads((folder / "moe_lowrank_report.json").read_text())
    assert abs(counts.achieved_ratio - ratio) <= 0.005 and counts.kept <= math.floor((1 - ratio) * D) * 4
    assert report["achieved_ratio"] == pytest.approx(counts.achieved_ratio, abs=1e-12)
    assert counts.index_bytes == 0
    for layer in cfg.moe_layers:
        spec = cfg.layers[layer]
        assert spec.method == "mobe"
        assert (spec.down.dense is None) == (name == "basis")
        r = report["layers"][str(layer)]
        assert r["down_mode"] == ("basis" if name == "basis" else "dense")
        assert len(r["gate"]["loss_curve"]) >= 2 and r["gate"]["fit_s"] > 0
        # auto with calibration data: activation-aware, its output error reported; basis: data-free, none
        assert ("output_rel_err" in r) == (name == "auto")


def test_written_checkpoint_materializes_the_fit(converted):
    """What the format materializes from the written tensors is what the report's weight error describes."""
    folder, _ = converted["basis"]
    cfg, _ = verify_checkpoint(folder)
    report = json.loads((folder / "moe_lowrank_report.json").read_text())
    comp, orig = Checkpoint(folder), Checkpoint(FIXTURE)
    stored = comp.get_many(cfg.tensor_specs(2))
    for p in PROJS:
        assert cfg.layers[2].proj(p).lowrank.act == Act.tanh
        num = den = 0.0
        for e in range(E):
            w = orig.get(f"model.layers.2.mlp.experts.{e}.{p}_proj.weight").double()
            num += float((w - materialize_projection(cfg, 2, p, e, stored.__getitem__)).square().sum())
            den += float(w.square().sum())
        assert report["layers"]["2"]["weight_rel_err"][p] == pytest.approx(math.sqrt(num / den), rel=1e-9)
        assert report["layers"]["2"][p]["loss"] == pytest.approx(num / den, rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_cuda_fit_matches_cpu(fixture_layer):
    s = MoBESettings(steps=10, eval_every=5)
    cpu = fit_bases(fixture_layer.gate, 4, 16, Act.silu, s)
    gpu = fit_bases(fixture_layer.gate, 4, 16, Act.silu, s, device="cuda")
    assert gpu.A.device.type == "cuda"
    assert gpu.info["loss"] == pytest.approx(cpu.info["loss"], rel=1e-2)
