"""FP8 copies of tiny test checkpoints, the way published FP8 checkpoints store them (DeepSeek-V3, Qwen3-*-FP8).

Every linear weight of the decoder layers (attention, dense MLP, shared and routed experts) becomes
float8_e4m3fn with a float32 ``weight_scale_inv`` per [bm, bn] block (block FP8) or one ``weight_scale`` (per-tensor
FP8); router gates, norms, embeddings and the head stay float and are listed in ``modules_to_not_convert``.
Beside it, a float "dequantized" copy holds exactly ``weight · scale`` (the same float32 arithmetic the converter
and the plugin use): the reference model that the FP8 checkpoint stands for.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
_FLOAT = re.compile(r"(norm|\.mlp\.gate\.weight|e_score_correction_bias|embed_tokens|lm_head)")


def _dequantize(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """weight · scale, block by block in a plain loop (independent of the code under test)."""
    out = q.float()
    if block is None:
        return out * s.float()
    bm, bn = block
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] *= s[i, j].float()
    return out


def _quantize(w: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, scale float32) with w ≈ q · scale per block (scale [ceil(o/bm), ceil(i/bn)]) or tensor."""
    if block is None:
        s = w.abs().max().clamp(min=1e-12) / FP8_MAX
        return (w / s).to(torch.float8_e4m3fn), s.reshape(()).float()
    bm, bn = block
    o, i = w.shape
    pad = torch.zeros(-(-o // bm) * bm, -(-i // bn) * bn)
    pad[:o, :i] = w
    amax = pad.view(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn).abs().amax(dim=(1, 3))  # [O, I]
    s = amax.clamp(min=1e-12) / FP8_MAX
    q = (w / s.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:o, :i]).to(torch.float8_e4m3fn)
    return q, s.float()


def make_fp8(src: Path, fp8_out: Path, dequant_out: Path, block: tuple[int, int] | None = (128, 128),
             static: bool = False) -> Path:
    """Write the FP8 checkpoint of float32 ``src`` to ``fp8_out``, its exact float copy to ``dequant_out``.
    ``static`` (per-tensor only): static activation quantization, an ``input_scale`` beside every FP8 weight (a
    made-up positive value per weight: the float copy, like vLLM on CPU, does not quantize activations)."""
    assert not (static and block), "vLLM: block FP8 needs dynamic activations"
    tensors = load_file(src / "model.safetensors")
    fp8, dense = {}, {}
    for i, (name, t) in enumerate(tensors.items()):
        quantized = name.startswith("model.layers.") and name.endswith(".weight") and t.dim() == 2
        if quantized and not _FLOAT.search(name):
            q, s = _quantize(t.float(), block)
            fp8[name] = q
            fp8[name.removesuffix("weight") + ("weight_scale_inv" if block else "weight_scale")] = s
            if static:
                fp8[name.removesuffix("weight") + "input_scale"] = torch.tensor(0.01 + 1e-4 * i)
            dense[name] = _dequantize(q, s, block)
        else:
            fp8[name] = dense[name] = t
    cfg = json.loads((src / "config.json").read_text())
    for out, tens, qc in ((fp8_out, fp8, True), (dequant_out, dense, False)):
        out.mkdir(parents=True)
        save_file(tens, out / "model.safetensors", metadata={"format": "pt"})
        for f in src.iterdir():
            if f.is_file() and f.name not in ("model.safetensors", "config.json"):
                shutil.copy(f, out / f.name)
        c = dict(cfg)
        if qc:
            ignored = sorted({n.removesuffix(".weight") for n in tensors if ".mlp.gate.weight" in n} | {"lm_head"})
            c["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
                                        "modules_to_not_convert": ignored,
                                        **({"weight_block_size": list(block)} if block else {})}
        (out / "config.json").write_text(json.dumps(c, indent=2))
    return fp8_out
