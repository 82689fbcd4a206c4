"""rs-moe's per-layer choice of the unit split on held-out calibration tokens [ours].

RS-MoE fixes one split for every layer (§3.4, Table 5: 80% of the budget on exact units, the lowest units pruned, a
shared ridge base for down). How much a layer gains from exact units depends on how concentrated its unit
importance is: on the fixtures the best split differs from layer to layer, and at high ratios plain per-expert
whitened SVD (no exact units, nothing pruned, no base) beats every split in some layers (docs/methods/rs-moe.md).

So with ``select=heldout`` (the default) each layer fits a small grid of splits — the paper's (``high_frac``,
``low_frac``, ``base`` as set), the grid ``GRID`` with fewer exact units, and the degenerate split, per-expert
whitened SVD at the same budget (``moe_svd_fit.per_expert_svd``: the ``svd`` baseline's fit) — on the calibration
tokens minus a held-out quarter (``LayerCalibration.holdout_split``), scores each by the routed MoE-output error
Σ_t‖Δy_t‖² on that quarter (``calibration.routed_output_sq_error``), and refits the winner on all calibration
tokens. The lowest held-out error wins (ties: the earlier candidate, the paper's first), so a layer is never
written with a split whose held-out error is above per-expert SVD's. The evaluation text is never seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..calibration import LayerCalibration, routed_output_sq_error
from ..errors import RatioError
from ..experts import ExpertWeights
from ..method import CompressedLayer

if TYPE_CHECKING:
    from .rs_moe import RSMoEMethod


@dataclass(frozen=True)
class Split:
    """One way to spend a layer's budget: exact share, pruned share and down base, or per-expert SVD (``svd``)."""

    high_frac: float
    low_frac: float
    base: str  # "ridge" | "freq" | "none"
    svd: bool = False

    @property
    def label(self) -> str:
        return "svd" if self.svd else f"high{self.high_frac:g}_low{self.low_frac:g}_{self.base}"


# (high_frac, low_frac, base; None = the settings' base) tried besides the paper's split: measured on the fixtures
# at ratio 0.6–0.8, fewer exact units won in most layers, and without the base when few units are exact
GRID: tuple[tuple[float, float, str | None], ...] = ((0.6, 0.1, None), (0.4, 0.05, "none"))
SVD_SPLIT = Split(0.0, 0.0, "none", svd=True)


def candidates(high_frac: float, low_frac: float, base: str) -> list[Split]:
    """The paper's split (as set) first, then ``GRID``, then per-expert SVD; duplicates removed."""
    out = [Split(high_frac, low_frac, base)] + [Split(h, l, b or base) for h, l, b in GRID] + [SVD_SPLIT]
    return list(dict.fromkeys(out))


def choose_split(method: RSMoEMethod, layer: int, weights: ExpertWeights, calib: LayerCalibration,
                 budget: int) -> CompressedLayer:
    """Fit every candidate on the fit part, keep the one with the lowest held-out routed MoE-output error, refit it
    on all of ``calib``; the errors go to the layer's report (``held_out_choice``)."""
    s = method.settings
    fit, held = calib.holdout_split()
    cache: dict = {}  # unit scores and gate/up whitening of the fit part, shared by the candidates
    err: dict[Split, float] = {}
    for c in candidates(s.high_frac, s.low_frac, s.base):
        try:
            comp = method.fit_split(layer, weights, fit, budget, c, cache)
        except RatioError:  # per-expert SVD below rank 1 at this budget: not a candidate
            continue
        err[c] = float(routed_output_sq_error(method.arch, layer, comp, weights, held).mean())
        del comp
    best = min(err, key=err.__getitem__)
    chosen = method.fit_split(layer, weights, calib, budget, best)
    chosen.info["held_out_choice"] = {
        "split": best.label, "judged_on": f"{held.num_tokens} held-out calibration tokens",
        "rms_dy": {c.label: round(math.sqrt(v), 6) for c, v in err.items()}}
    return chosen

