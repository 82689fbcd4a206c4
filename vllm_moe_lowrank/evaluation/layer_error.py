"""Per-layer error of a compressed checkpoint's MoE layers against the dense model, on held-out text.

The reference (dense) checkpoint is streamed one decoder layer at a time through transformers' own modules
(``converters.runner.LayerRunner``: only the current layer is in memory), carrying two hidden-state streams:

* reference: the dense model. At every MoE layer an ``ExpertsProbe`` records the routed experts' inputs and
  routing.
* compressed: the same model with each compressed layer's routed experts computed from the stored factors by
  the kernels' torch path (``kernels.experts_forward``, the plugin's compute path; no dense weight is built).

Per MoE layer:

* ``moe_rel_err`` = ‖Ŷ − Y‖_F / ‖Y‖_F: the routed-expert output, compressed vs dense, on the *reference* stream's
  inputs and routing — the layer's own error, nothing accumulated (the held-out counterpart of the converter
  report's calibration ``output_rel_err``, shown beside it as ``calib_rel_err``);
* ``hidden_rel_err`` = ‖Ĥ − H‖_F / ‖H‖_F: the decoder layer's output hidden states, compressed stream vs reference
  stream — the error accumulated through every layer so far.

Attention, norms, routers and uncompressed layers come from the reference; the compressed checkpoint's copies of
them are checked to be identical first (so ``--reference`` must be the checkpoint CKPT was converted from).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vllm_moe_lowrank.format import FormatError, MoELowRankConfig


class CompressedExperts(nn.Module):
    """Stands in for a layer's routed experts: computes them from the compressed factors (kernels' torch path)."""

    def __init__(self, cfg: MoELowRankConfig, layer: int, tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32):
        from vllm_moe_lowrank.kernels import LayerLayout

        super().__init__()
        self.layout = LayerLayout(cfg, layer)
        bufs = self.layout.new_buffers(dtype)  # plain attributes, not nn buffers: the runner moves modules to meta
        for name in self.layout.blocks:
            self.layout.store(bufs, name, tensors[name])
        bufs.update(self.layout.finalize(bufs))
        self.bufs = bufs

    def experts(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, n], ids [T, k], w [T, k] -> [T, n] = Σ_k w_k · expert_{ids_k}(x)."""
        from vllm_moe_lowrank.kernels import experts_forward

        return experts_forward(self.layout, self.bufs, x, w.float(), ids)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, n]
        y = self.experts(x.float(), top_k_index.reshape(x.shape[0], -1), top_k_weights.reshape(x.shape[0], -1))
        return y.to(hidden_states.dtype).reshape(hidden_states.shape)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _check_pair(cfg: MoELowRankConfig, arch, comp, ref) -> None:
    mine = (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, list(cfg.moe_layers), cfg.moe_prefix)
    theirs = (arch.num_experts, arch.hidden_size, arch.intermediate_size, list(arch.moe_layers), arch.moe_prefix)
    if mine != theirs:
        raise FormatError(f"{comp.path} was not converted from {ref.path}: (experts, hidden, intermediate, MoE "
                          f"layers, prefix) {mine} != {theirs}")


def _check_shared_tensors(cfg: MoELowRankConfig, comp, ref, layer: int, expert_names: set[str]) -> None:
    """The compressed checkpoint's non-expert tensors of ``layer`` equal the reference's (same names, values)."""
    prefix = f"model.layers.{layer}."
    moe = cfg.prefix(layer) + "."
    names_c = {n for n in comp.tensors if n.startswith(prefix) and not n.startswith(moe)}
    names_r = {n for n in ref.tensors if n.startswith(prefix) and n not in expert_names and not n.startswith(moe)}
    if names_c != names_r:
        diff = sorted(names_c ^ names_r)
        raise FormatError(f"{comp.path}: layer {layer} non-expert tensors differ from {ref.path} in names "
                          f"(e.g. {diff[0]!r}); --reference must be the checkpoint CKPT was converted from")
    a, b = comp.get_many(sorted(names_c)), ref.get_many(sorted(names_r))
    for n in a:
        if not torch.equal(a[n].float(), b[n].float()):
            raise FormatError(f"{comp.path}: tensor {n!r} differs from the reference's; --reference must be the "
                              "checkpoint CKPT was converted from")


@torch.no_grad()
def layer_errors(ckpt: str | Path, reference: str | Path, text_file: str | Path, window: int = 256,
                 max_tokens: int = 4096, batch_size: int = 8, device: str = "cpu") -> dict:
    """Per-layer errors of compressed ``ckpt`` against dense ``reference`` on the first ``max_tokens`` tokens of
    ``text_file`` in ``window``-token windows (the ``moe-eval ppl`` windows, fewer of them by default)."""
    from vllm_moe_lowrank.converters.arch import detect
    from vllm_moe_lowrank.converters.calibration import dense_expert_fn, moe_output
    from vllm_moe_lowrank.converters.checkpoint import Checkpoint
    from vllm_moe_lowrank.converters.experts import expert_tensor_names, load_expert_weights
    from vllm_moe_lowrank.converters.runner import ExpertsProbe, LayerRunner

    from .perplexity import eval_windows

    comp, ref = Checkpoint(ckpt), Checkpoint(reference)
    cfg = MoELowRankConfig.from_hf_config(comp.config)
    if ref.config.get("quantization_config"):
        raise FormatError(f"{ref.path}: --reference must be the dense checkpoint CKPT was converted from; this one "
                          "is quantized")
    arch = detect(ref.config, str(ref.path / "config.json"))
    _check_pair(cfg, arch, comp, ref)
    report_file = comp.path / "moe_lowrank_report.json"
    calib = json.loads(report_file.read_text())["layers"] if report_file.is_file() else {}

    windows = eval_windows(ref.path, text_file, window, max_tokens)  # [N, window]
    runner = LayerRunner(ref, arch, device)
    h_ref = [runner.embed(b) for b in windows.split(batch_size)]  # [B, window, n] each
    h_cmp = [h.clone() for h in h_ref]
    rows = []
    for layer in range(arch.num_layers):
        is_moe = layer in arch.moe_layers
        weights = load_expert_weights(ref, arch, layer) if is_moe else None
        names = set(expert_tensor_names(ref, arch, layer)) if is_moe else set()
        _check_shared_tensors(cfg, comp, ref, layer, names)
        module, probe = runner.load_layer(layer, weights)
        h_ref_next = runner.forward_layer(module, h_ref)
        row: dict = {"layer": layer, "status": "no-moe"}
        if is_moe:
            seen = probe.calibration(arch.num_experts)  # x [T, n], topk_ids [T, k], topk_weights [T, k]
            if layer in cfg.layers:
                tensors = comp.get_many(cfg.tensor_specs(layer))
                experts = CompressedExperts(cfg, layer, tensors)
                del tensors
                y = moe_output(seen.x, seen.topk_ids, seen.topk_weights,
                               dense_expert_fn(weights.gate, weights.up, weights.down))  # [T, n]
                y_hat = experts.experts(seen.x.float(), seen.topk_ids, seen.topk_weights)
                row = {"layer": layer, "status": "compressed", "moe_rel_err": _rel(y_hat, y)}
                c = calib.get(str(layer), {}).get("output_rel_err")
                if c is not None:
                    row["calib_rel_err"] = c
                runner.set_experts(module, experts)
            else:  # left dense by the converter: its stored experts, which should equal the reference's
                stored = load_expert_weights(comp, arch, layer)
                row = {"layer": layer, "status": "dense", "moe_rel_err": max(
                    _rel(stored.proj(p), weights.proj(p)) for p in ("gate", "up", "down"))}
                runner.set_experts(module, ExpertsProbe(stored))
            del seen
        h_cmp = runner.forward_layer(module, h_cmp)
        runner.release_layer(layer)
        h_ref = h_ref_next
        row["hidden_rel_err"] = _rel(torch.cat([h.reshape(-1, h.shape[-1]) for h in h_cmp]),
                                     torch.cat([h.reshape(-1, h.shape[-1]) for h in h_ref]))
        rows.append(row)
    errs = [r["moe_rel_err"] for r in rows if r["status"] == "compressed"]
    return {"checkpoint": str(ckpt), "reference": str(reference), "text": str(text_file), "method": cfg.method,
            "achieved_ratio": cfg.achieved_ratio, "window": window, "tokens": int(windows.numel()),
            "layers": rows, "mean_moe_rel_err": sum(errs) / len(errs) if errs else 0.0,
            "final_hidden_rel_err": rows[-1]["hidden_rel_err"]}


def format_table(result: dict) -> str:
    lines = [f"{result['checkpoint']} vs {result['reference']}: method {result['method']}, achieved ratio "
             f"{result['achieved_ratio']}, {result['tokens']} held-out tokens",
             "", "| layer | experts | MoE out rel err | (calibration) | hidden rel err |", "|---|---|---|---|---|"]
    for r in result["layers"]:
        moe = f"{r['moe_rel_err']:.4f}" if "moe_rel_err" in r else "-"
        cal = f"{r['calib_rel_err']:.4f}" if "calib_rel_err" in r else "-"
        lines.append(f"| {r['layer']} | {r['status']} | {moe} | {cal} | {r['hidden_rel_err']:.4f} |")
    lines.append(f"\nmean MoE output error {result['mean_moe_rel_err']:.4f}, final hidden-state error "
                 f"{result['final_hidden_rel_err']:.4f}")
    return "\n".join(lines)
