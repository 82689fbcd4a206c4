"""Shared pieces of the per-method tests: the fixture's architecture, a method built in-process, fake layers."""

from __future__ import annotations

import json

import torch
from model_factory import FIXTURE

from vllm_moe_lowrank.converters.arch import detect
from vllm_moe_lowrank.converters.calibration import LayerCalibration
from vllm_moe_lowrank.converters.experts import ExpertWeights
from vllm_moe_lowrank.converters.method import MethodContext, build_method

CALIB = ["--calib-data", str(FIXTURE / "calib.txt"), "--num-samples", "16", "--seq-len", "128"]
ARCH = detect(json.loads((FIXTURE / "config.json").read_text()), "config.json")


def make_method(name: str, ratio: float, options, arch=ARCH):
    """The converter's method ``name`` at ``ratio`` with ``-o`` options, on CPU, outside the pipeline."""
    ctx = MethodContext(arch=arch, ratio=ratio, device=torch.device("cpu"), load_experts=None)
    return build_method(name, ctx, list(options))


def fake_calib(E: int, n: int, T: int = 3000, k: int = 2, seed: int = 0, outlier: bool = False) -> LayerCalibration:
    """Correlated inputs with skewed routing (expert e picked ∝ 1/(e+1)): distinct frequencies, rare experts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=g) @ (torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n))  # [T, n]
    if outlier:
        x[:, 3] *= 8.0  # an outlier channel, as real hidden states have
    probs = 1.0 / torch.arange(1, E + 1).double()
    ids = torch.stack([torch.multinomial(probs, k, replacement=False, generator=g) for _ in range(T)])  # [T, k]
    return LayerCalibration(x=x, topk_ids=ids, topk_weights=torch.full((T, k), 1.0 / k), num_experts=E)


def fake_weights(E: int, n: int, m: int, seed: int = 1) -> ExpertWeights:
    """Experts whose gate shares a common component, as real experts do."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(m, n, generator=g)
    return ExpertWeights(gate=torch.stack([common + torch.randn(m, n, generator=g) for _ in range(E)]) / n ** 0.5,
                         up=torch.randn(E, m, n, generator=g) / n ** 0.5,
                         down=torch.randn(E, n, m, generator=g) / m ** 0.5)
