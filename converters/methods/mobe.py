"""``mobe``: Mixture-of-Basis-Experts (Chen et al. 2025, arXiv 2508.05257; official code inclusionAI/MoBE).

Each compressed projection type P of a layer (gate and up; down only with the ``down`` extension) is rewritten as
(MoBE Eq. 3, docs/methods.md §3.2)::

    Ŵ_e = σ · A_e · f(Σ_j α_ej · B_j),   α_e = softmax(w_e),   f ∈ {silu, tanh, identity}

with J shared bases B_j ``[r, in]``, a per-expert left factor A_e ``[out, r]`` and per-expert mixing logits w_e
``[J]``; σ is the standard deviation of all E weights of the type (targets are fitted as W/σ). The factors are
fitted to the original weights by Adam from a grouped-SVD initialization with best-state tracking and early
stopping (data-free), optionally weighting the error by each expert's calibration input Gram (our extension).

In the ``moe_lowrank`` format this is a ``lowrank`` term with ``num_bases=J``: shared ``lr_v`` ``[J·r, in]`` (B_1..B_J
stacked), per-expert ``lr_mix`` ``[J]`` (α_e, after softmax) and per-expert ``lr_u`` = σ·A_e ``[out, r]``.
See docs/methods/mobe.md for every choice made where the paper is silent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from vllm_moe_lowrank.format import Act, DenseTerm, LayerSpec, LowRankTerm, ProjSpec, apply_act

from ..budget import layer_budget
from ..calibration import LayerCalibration
from ..errors import RatioError
from ..experts import ExpertWeights
from ..method import CompressedLayer, Damp, Method, MethodSettings, Shrink


AUTO_DOWN_RATIO = 1 / 3  # down=auto: the largest ratio at which down stays dense (gate/up keep ≥ 1/2)
# --device cuda: the official code's fit length (inclusionAI/MoBE train.py: 10k+ steps, eval every 200, patience
# 2k) for steps / eval_every / patience not given with -o; on CPU the short defaults of MoBESettings
GPU_FIT = {"steps": 10000, "eval_every": 200, "patience": 2000}


class MoBESettings(MethodSettings):
    act: Act = Act.silu  # f, applied element-wise to the mixed basis (weight space)
    num_bases: int = Field(0, ge=0)  # J; 0: derived from experts_per_basis
    experts_per_basis: float = Field(4.0, gt=0)  # J = round(E / this): the paper's E/J (128/32, 256/64)
    down: Literal["auto", "dense", "basis"] = "auto"  # auto: dense down up to ratio AUTO_DOWN_RATIO, then basis
    steps: int = Field(500, ge=0)  # Adam steps per fit (CPU-friendly; paper: 10k-50k on GPU)
    lr: float = Field(0.05, gt=0)  # Adam step relative to each parameter's initial RMS (logits: absolute)
    schedule: Literal["constant", "cosine"] = "constant"  # paper: constant
    eval_every: int = Field(50, ge=1)  # best-state check interval (paper: 200)
    patience: int = Field(500, ge=1)  # stop after this many steps without improvement (paper: 2000)
    min_delta: float = Field(1e-4, ge=0)  # relative improvement that counts for patience
    init_mix: float = Field(0.9, gt=0, lt=1)  # α of an expert's own group at init (paper: one-hot logits)
    basis_rms: float = Field(0.0, ge=0)  # RMS of the initial basis entries (how nonlinear f starts); 0: per act
    refit_left: bool = True  # closed-form least-squares A_e after Adam (exact minimizer given the bases)
    batch_experts: int = Field(0, ge=0)  # experts per backward pass (gradient accumulation); 0: all at once
    # weight the error by each expert's calibration Gram [ours]; None: on when --calib-data is given (measured at
    # every ratio on both fixtures: docs/methods/mobe.md), off otherwise (data-free, the paper)
    activation_aware: bool | None = None
    damp: Damp = 1e-4  # relative Gram damping (activation_aware)
    shrink: Shrink = 0.1  # rare experts' Grams shrink toward the layer mean (activation_aware)


# ----- ratio → (J, r) ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BasisShape:
    """One fitted type: J bases of rank r over ``inp`` columns, E left factors of ``out`` rows."""

    num_bases: int
    rank: int
    out: int
    inp: int
    experts: int

    @property
    def params(self) -> int:
        """Stored floats: E·out·r (lr_u) + J·r·in (lr_v) + E·J (lr_mix)."""
        return self.experts * self.out * self.rank + self.num_bases * self.rank * self.inp + \
            self.experts * self.num_bases


def shape_for_budget(budget: int, E: int, out: int, inp: int, J: int) -> BasisShape | None:
    """Largest rank r ≤ min(out, in) with J bases within ``budget``; at the rank cap the spare budget buys bases
    (the paper's r = m regime). None when not even rank 1 fits."""
    cap = min(out, inp)
    for j in range(J, 0, -1):
        r = (budget - E * j) // (E * out + j * inp)
        if r >= 1:
            if r >= cap:
                r = cap
                j = max(j, (budget - E * out * r) // (r * inp + E))
            return BasisShape(j, r, out, inp, E)
    return None


def _step_up(s: BasisShape) -> BasisShape:
    """The next larger shape: one more rank, or one more basis at the rank cap."""
    if s.rank < min(s.out, s.inp):
        return BasisShape(s.num_bases, s.rank + 1, s.out, s.inp, s.experts)
    return BasisShape(s.num_bases + 1, s.rank, s.out, s.inp, s.experts)


def split_budget(budget: int, E: int, dims: dict[str, tuple[int, int]], J: int) -> dict[str, BasisShape] | None:
    """Shapes for the fitted types sharing ``budget`` equally, then topped up one step at a time (in type order)
    while the total still fits, so the layer keeps as close to ``budget`` as one step allows."""
    each = budget // len(dims)
    shapes = {}
    for p, (o, i) in dims.items():
        s = shape_for_budget(each, E, o, i, J)
        if s is None:
            return None
        shapes[p] = s
    grown = True
    while grown:
        grown = False
        for p in dims:
            bigger = _step_up(shapes[p])
            if sum(s.params for s in shapes.values()) - shapes[p].params + bigger.params <= budget:
                shapes[p], grown = bigger, True
    return shapes


# ----- the fit ------------------------------------------------------------------------------------------------------
@dataclass
class BasisFit:
    """A fitted type: Ŵ_e = scale · A_e · f(Σ_j softmax(w_e)_j B_j)."""

    A: torch.Tensor  # [E, out, r] float32
    B: torch.Tensor  # [J, r, in] float32
    logits: torch.Tensor  # [E, J] float32
    act: Act
    scale: float  # σ
    info: dict[str, Any] = field(default_factory=dict)

    def mix(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1)  # [E, J]

    def right(self, experts: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """f(Σ_j α_ej B_j) ``[e, r, in]``."""
        return apply_act(self.act, torch.einsum("ej,jri->eri", self.mix()[experts], self.B))

    def weights(self) -> torch.Tensor:
        """Ŵ ``[E, out, in]`` (σ included)."""
        return self.scale * (self.A @ self.right())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lr_u = σ·A ``[E, out, r]``, lr_v ``[J·r, in]``, lr_mix ``[E, J]``) as stored."""
        J, r, n = self.B.shape
        return self.scale * self.A, self.B.reshape(J * r, n), self.mix()


def balanced_groups(E: int, J: int) -> torch.Tensor:
    """[E] group of each expert: J index-contiguous groups of sizes differing by at most one (paper init)."""
    return torch.cat([torch.full((len(c),), g) for g, c in enumerate(torch.arange(E).tensor_split(J))])


def grouped_svd_bases(Z: torch.Tensor, groups: torch.Tensor, J: int, r: int) -> torch.Tensor:
    """B_j = top-r right singular vectors of group j's stacked weights [(|g|·out), in] (MoBE init), ``[J, r, in]``.

    A group with fewer than r singular directions is padded with the leading directions of the whole layer."""
    n = Z.shape[2]
    out = torch.zeros(J, r, n, dtype=Z.dtype, device=Z.device)
    layer_V = None
    for j in range(J):
        stack = Z[groups == j].reshape(-1, n).double()  # [|g|·out, in]
        _, _, Vh = torch.linalg.svd(stack, full_matrices=False)  # Vh [k, in]
        k = min(r, Vh.shape[0])
        out[j, :k] = Vh[:k].to(Z.dtype)
        if k < r:
            if layer_V is None:
                layer_V = torch.linalg.svd(Z.reshape(-1, n).double(), full_matrices=False)[2].to(Z.dtype)
            out[j, k:] = layer_V[k:r]
    return out


def solve_left(Z: torch.Tensor, R: torch.Tensor, gram: torch.Tensor | None, ridge: float = 1e-6,
               chunk: int = 16) -> torch.Tensor:
    """argmin_A Σ_e ‖(Z_e − A_e R_e) G_e^½‖² = Z_e G_e R_eᵀ (R_e G_e R_eᵀ)⁻¹ per expert ``[E, out, r]``.

    Z ``[E, out, in]``, R ``[E, r, in]``, gram ``[E, in, in]`` or None (G = I); a relative ridge keeps it solvable.
    Solved in float64, ``chunk`` experts at a time (bounded memory)."""
    out = []
    for c in range(0, Z.shape[0], chunk):
        Rd = R[c:c + chunk].double()  # [e, r, in]
        RG = Rd if gram is None else Rd @ gram[c:c + chunk].double()  # [e, r, in]
        M = RG @ Rd.transpose(1, 2)  # [e, r, r]
        eye = torch.eye(M.shape[1], dtype=M.dtype, device=M.device)
        M = M + ridge * M.diagonal(dim1=1, dim2=2).mean(1)[:, None, None].clamp(min=1e-30) * eye
        rhs = Z[c:c + chunk].double() @ RG.transpose(1, 2)  # [e, out, r]
        out.append(torch.linalg.solve(M, rhs.transpose(1, 2)).transpose(1, 2).to(Z.dtype))
    return torch.cat(out)


class _Loss:
    """Relative squared error Σ_e ‖(Ŵ_e − Z_e) G_e^½‖² / Σ_e ‖Z_e G_e^½‖².

    G_e = I is the paper's MSE on W/σ up to a constant factor; a calibration Gram makes it the output error."""

    def __init__(self, Z: torch.Tensor, gram: torch.Tensor | None):
        self.Z, self.gram = Z, gram
        self.norm = float(self._energy(Z, slice(None)))

    def _energy(self, D: torch.Tensor, experts) -> torch.Tensor:
        if self.gram is None:
            return D.square().sum()
        return ((D @ self.gram[experts]) * D).sum()  # Σ_e tr(D_e G_e D_eᵀ)

    def __call__(self, W_hat: torch.Tensor, experts: slice) -> torch.Tensor:
        return self._energy(W_hat - self.Z[experts], experts) / self.norm


def _init_logits(E: int, J: int, groups: torch.Tensor, own: float, device) -> torch.Tensor:
    """Logits whose softmax gives ``own`` to the expert's group and (1 − own)/(J − 1) to each other basis."""
    logits = torch.zeros(E, J, device=device)
    if J > 1:
        own = min(max(own, 1.0 / J), 1 - 1e-6)
        logits[torch.arange(E), groups.to(device)] = math.log(own * (J - 1) / (1 - own))
    return logits


_BASIS_RMS = {Act.silu: 0.3, Act.tanh: 0.7, Act.identity: 1.0}  # measured on the fixture (docs/methods/mobe.md)


def init_fit(Z: torch.Tensor, J: int, r: int, act: Act, gram: torch.Tensor | None,
             s: MoBESettings) -> BasisFit:
    """Grouped-SVD initialization (paper §3.3), with our changes: bases scaled to ``basis_rms``, an ``init_mix``
    peaked mix, and A_e solved in closed form for the chosen f and mix (so the start is as good as the bases)."""
    E, out, n = Z.shape
    groups = balanced_groups(E, J).to(Z.device)
    rms = s.basis_rms or _BASIS_RMS[act]
    B = grouped_svd_bases(Z, groups, J, r) * (rms * math.sqrt(n))  # [J, r, in], entries RMS basis_rms
    fit = BasisFit(A=torch.zeros(E, out, r, device=Z.device), B=B, act=act, scale=1.0,
                   logits=_init_logits(E, J, groups, s.init_mix, Z.device))
    fit.A = solve_left(Z, fit.right(), gram)
    return fit


def _lr_at(s: MoBESettings, step: int) -> float:
    if s.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * step / max(s.steps, 1)))


def fit_bases(W: torch.Tensor, J: int, r: int, act: Act, s: MoBESettings, gram: torch.Tensor | None = None,
              device: torch.device | str = "cpu") -> BasisFit:
    """Fit Ŵ_e = σ·A_e·f(Σ_j softmax(w_e)_j B_j) to W ``[E, out, in]`` (MoBE §3, Eq. 3; train.py).

    Adam on (A, B, w) with full-batch gradients (accumulated over ``batch_experts`` chunks), the best state kept
    every ``eval_every`` steps, early stopping after ``patience`` steps without a ``min_delta`` relative gain, and
    a final closed-form refit of A. ``gram`` ``[E, in, in]`` weights each expert's error (activation-aware)."""
    t0 = time.time()
    Z = W.to(device=device, dtype=torch.float32)  # [E, out, in]
    sigma = float(Z.std())  # paper: global std of the layer's weights of this type; μ ≈ 0 is not removed
    Z = Z / sigma if Z.data_ptr() == W.data_ptr() else Z.div_(sigma)  # never scale the caller's tensor in place
    if gram is not None:
        gram = gram.to(device=device, dtype=torch.float32)
    E = Z.shape[0]
    loss_fn = _Loss(Z, gram)
    fit = init_fit(Z, J, r, act, gram, s)
    params = [fit.A.requires_grad_(), fit.B.requires_grad_(), fit.logits.requires_grad_()]
    rel = [float(fit.A.detach().square().mean().sqrt()), float(fit.B.detach().square().mean().sqrt()), 1.0]
    opt = torch.optim.Adam([{"params": [p], "lr": s.lr * k} for p, k in zip(params, rel)])
    base_lrs = [g["lr"] for g in opt.param_groups]
    chunks = [slice(a, min(a + (s.batch_experts or E), E)) for a in range(0, E, s.batch_experts or E)]

    def total_loss(backward: bool) -> float:
        tot = 0.0
        for c in chunks:
            loss = loss_fn(fit.A[c] @ fit.right(c), c)
            if backward:
                loss.backward()
            tot += float(loss.detach())
        return tot

    with torch.no_grad():
        init_loss = total_loss(False)
    best, best_step, best_state = init_loss, 0, [p.detach().clone() for p in params]
    curve = [[0, round(init_loss, 7)]]
    last_gain = 0
    steps_done = 0
    for step in range(1, s.steps + 1):
        opt.zero_grad(set_to_none=True)
        loss_before = total_loss(True)  # loss of the parameters before this update
        if (step - 1) % s.eval_every == 0 and step > 1:
            curve.append([step - 1, round(loss_before, 7)])
            if loss_before < best:  # the state this loss belongs to: the parameters before opt.step()
                if loss_before < best * (1 - s.min_delta):
                    last_gain = step - 1
                best, best_step = loss_before, step - 1
                best_state = [p.detach().clone() for p in params]
            if step - 1 - last_gain >= s.patience:
                break
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * _lr_at(s, step - 1)
        opt.step()
        steps_done = step
    with torch.no_grad():
        final = total_loss(False)
        if final < best:
            best, best_step, best_state = final, steps_done, [p.detach().clone() for p in params]
        if steps_done:
            curve.append([steps_done, round(final, 7)])
    fit = BasisFit(A=best_state[0], B=best_state[1], logits=best_state[2], act=act, scale=1.0)
    info = {"init_loss": init_loss, "adam_loss": best, "best_step": best_step, "steps": steps_done}
    loss = best
    if s.refit_left:  # exact minimizer over A; kept only if round-off did not make it worse
        A = solve_left(Z, fit.right(), gram)
        with torch.no_grad():
            refit = sum(float(loss_fn(A[c] @ fit.right(c), c)) for c in chunks)
        if refit <= best:
            fit.A, loss = A, refit
    fit.scale = sigma
    fit.info = {**info, "loss": loss, "loss_curve": curve, "fit_s": round(time.time() - t0, 3)}
    return fit


# ----- the method ---------------------------------------------------------------------------------------------------
class MoBEMethod(Method):
    name = "mobe"
    Settings = MoBESettings

    def __init__(self, ctx, settings: MoBESettings):
        update = {}
        if ctx.device.type == "cuda":
            update = {k: v for k, v in GPU_FIT.items() if k not in settings.model_fields_set}
        if settings.activation_aware is None:
            update["activation_aware"] = ctx.has_calib_data
        settings = settings.model_copy(update=update)
        super().__init__(ctx, settings)
        self.needs_calibration = settings.activation_aware

    # --- configuration from the ratio ---
    def _num_bases(self) -> int:
        E, s = self.arch.num_experts, self.settings
        return s.num_bases if s.num_bases > 0 else max(1, min(E, round(E / s.experts_per_basis)))

    def _dims(self, with_down: bool) -> dict[str, tuple[int, int]]:
        n, m = self.arch.hidden_size, self.arch.intermediate_size
        dims = {"gate": (m, n), "up": (m, n)}
        if with_down:
            dims["down"] = (n, m)  # input-side basis over the intermediate units (the format's right factor)
        return dims

    def _shapes(self, with_down: bool) -> dict[str, BasisShape] | None:
        a = self.arch
        E, n, m = a.num_experts, a.hidden_size, a.intermediate_size
        budget = layer_budget(self.ctx.ratio, E, n, m) - (0 if with_down else E * n * m)
        return split_budget(budget, E, self._dims(with_down), self._num_bases()) if budget > 0 else None

    def _gate_up_limit(self) -> float:
        E, n, m = self.arch.num_experts, self.arch.hidden_size, self.arch.intermediate_size
        return 1 - (E * n * m + 2 * BasisShape(1, 1, m, n, E).params) / (3 * E * n * m)

    def _all_limit(self) -> float:
        E, n, m = self.arch.num_experts, self.arch.hidden_size, self.arch.intermediate_size
        return 1 - (2 * BasisShape(1, 1, m, n, E).params + BasisShape(1, 1, n, m, E).params) / (3 * E * n * m)

    def plan(self) -> tuple[bool, dict[str, BasisShape]]:
        """(down compressed?, shape per fitted type); raises RatioError when the ratio cannot be met.

        down=auto keeps the paper's dense down while gate/up keep at least half their parameters (ratio ≤ 1/3)
        and fits down as a basis mix beyond (measured on the fixture: docs/methods/mobe.md)."""
        s = self.settings
        if s.down == "dense" or (s.down == "auto" and self.ctx.ratio <= AUTO_DOWN_RATIO):
            shapes = self._shapes(False)
            if shapes is not None:
                return False, shapes
            if s.down == "dense":
                raise RatioError(
                    f"--ratio {self.ctx.ratio}: infeasible for mobe with down=dense (gate/up alone can remove at "
                    f"most {self._gate_up_limit():.4f} of the expert parameters); use a smaller ratio or "
                    f"-o down=basis (limit {self._all_limit():.4f})")
        shapes = self._shapes(True)
        if shapes is None:
            raise RatioError(f"--ratio {self.ctx.ratio}: infeasible for mobe (rank would drop below 1 with one "
                             f"basis); the largest feasible ratio is {self._all_limit():.4f}")
        return True, shapes

    def check_feasible(self) -> None:
        self.plan()

    def dry_run(self) -> list[dict[str, Any]]:
        with_down, shapes = self.plan()
        per_layer = {p: {"num_bases": sh.num_bases, "rank": sh.rank, "params": sh.params} for p, sh in shapes.items()}
        return [{"layer": l, "down_mode": "basis" if with_down else "dense", **per_layer} for l in self.arch.moe_layers]

    # --- the work ---
    def _grams(self, p: str, weights: ExpertWeights, calib: LayerCalibration) -> torch.Tensor:
        """[E, in, in] regularized per-expert Grams of gate/up's input (calibration.py's API), per token."""
        s, E = self.settings, self.arch.num_experts
        return torch.stack([(calib.expert_gram_in(e, s.damp, s.shrink) / max(calib.num_tokens, 1)).float()
                            for e in range(E)])

    def _down_targets(self, weights: ExpertWeights, calib: LayerCalibration,
                      gate_up: dict[str, BasisFit]) -> tuple[torch.Tensor, torch.Tensor]:
        """(W* [E, n, m], Ĝ [E, m, m] per token): down refitted on ĥ of the fitted gate/up (calibration.down_target;
        ``--down-fit dense``: the original down and h's Grams)."""
        s = self.settings
        Wg, Wu = (gate_up[p].weights().detach().cpu().to(self.ctx.dtype).double() for p in ("gate", "up"))
        Ws, Gs = [], []
        for e in range(self.arch.num_experts):
            W, G = calib.down_target(e, weights, Wg[e], Wu[e], s.damp, s.shrink)
            Ws.append(W.float())
            Gs.append((G / max(calib.num_tokens, 1)).float())
        return torch.stack(Ws), torch.stack(Gs)

    def compress_layer(self, layer: int, weights: ExpertWeights, calib: LayerCalibration | None) -> CompressedLayer:
        s = self.settings
        with_down, shapes = self.plan()
        tensors, info, specs = {}, {"down_mode": "basis" if with_down else "dense"}, {}
        gram_in = None
        fits: dict[str, BasisFit] = {}
        aware = s.activation_aware and calib is not None
        for p, sh in shapes.items():
            gram, target = None, weights.proj(p)
            if aware:
                if p == "down":
                    target, gram = self._down_targets(weights, calib, fits)
                else:
                    gram = gram_in if gram_in is not None else self._grams("gate", weights, calib)
                    gram_in = gram
            fit = fit_bases(target, sh.num_bases, sh.rank, s.act, s, gram, self.ctx.device)
            fits[p] = fit
            U, V, mix = fit.tensors()
            for e in range(self.arch.num_experts):
                tensors[p, "lr_u", e] = U[e].detach().cpu()
                tensors[p, "lr_mix", e] = mix[e].detach().cpu()
            tensors[p, "lr_v", None] = V.detach().cpu()
            specs[p] = ProjSpec(lowrank=LowRankTerm(ranks=[sh.rank] * self.arch.num_experts,
                                                    num_bases=sh.num_bases, act=s.act))
            info[p] = {"num_bases": sh.num_bases, "rank": sh.rank, **fit.info}
        if not with_down:  # dense down: refitted on ĥ when calibrated (full-rank least squares, same size)
            down = self._down_targets(weights, calib, fits)[0] if aware else weights.down
            for e in range(self.arch.num_experts):
                tensors["down", "weight", e] = down[e].float().cpu()
            specs["down"] = ProjSpec(dense=DenseTerm())
        return CompressedLayer(spec=LayerSpec(method=self.name, **specs), tensors=tensors, info=info)


METHOD = MoBEMethod
