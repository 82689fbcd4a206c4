"""Peak RSS of a streaming conversion against the checkpoint size (target: below 0.35×).

Builds a synthetic 12-layer Qwen3-MoE checkpoint large enough for the bound to mean something (hidden 1024,
128 experts of intermediate 512, bf16: ~4.9 GB, one shard per layer), converts it with the calibrated `svd`
baseline, and records the converter process's own peak resident set size (VmHWM, see peak_rss.py) in
benchmarks/results/convert_memory.json.

    python benchmarks/convert_memory.py [--layers 12] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from quality import machine, measured_run
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "qwen3-moe-pydocs"
WORK = ROOT / "benchmarks" / ".cache" / "memory"
CONFIG = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=1024, num_hidden_layers=12,
              num_attention_heads=8, num_key_value_heads=2, head_dim=128, intermediate_size=2048,
              moe_intermediate_size=512, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
              vocab_size=4096, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, torch_dtype="bfloat16",
              hidden_act="silu", decoder_sparse_step=1, mlp_only_layers=[])


def build(out: Path, layers: int, **overrides) -> int:
    """Write the synthetic checkpoint one layer at a time (``overrides``: config.json entries, e.g. other expert
    shapes); returns its size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    c = {**CONFIG, "num_hidden_layers": layers, **overrides}
    n, m, E, h, kv, hd = (c["hidden_size"], c["moe_intermediate_size"], c["num_experts"],
                          c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"])
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    weight_map = {}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t = {p + "input_layernorm.weight": torch.ones(n, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(n, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": rnd(h * hd, n), p + "self_attn.k_proj.weight": rnd(kv * hd, n),
             p + "self_attn.v_proj.weight": rnd(kv * hd, n), p + "self_attn.o_proj.weight": rnd(n, h * hd),
             p + "self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
             p + "self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
             p + "mlp.gate.weight": rnd(E, n, std=0.1)}
        for e in range(E):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(m, n)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(m, n)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(n, m)
        file = f"model-{layer:05d}.safetensors"
        save_file(t, out / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in t})
    rest = {"model.embed_tokens.weight": rnd(c["vocab_size"], n), "lm_head.weight": rnd(c["vocab_size"], n),
            "model.norm.weight": torch.ones(n, dtype=torch.bfloat16)}
    save_file(rest, out / "model-rest.safetensors", metadata={"format": "pt"})
    weight_map.update({k: "model-rest.safetensors" for k in rest})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(c, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / f, out / f)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and output")
    a = ap.parse_args()
    src, out = WORK / "ckpt", WORK / "out"
    shutil.rmtree(WORK, ignore_errors=True)
    t0 = time.time()
    size = build(src, a.layers)
    build_s = time.time() - t0
    cmd = [sys.executable, "-m", "vllm_moe_lowrank.converters.cli", "--method", "svd", "--ratio", "0.3", str(src),
           str(out), "--calib-data", str(FIXTURE / "calib.txt"), "--num-samples", "8", "--seq-len", "128"]
    run = measured_run(cmd, WORK / "convert.log")
    if run["returncode"]:
        raise SystemExit(f"conversion failed (exit {run['returncode']}):\n{run['stderr'][-3000:]}")
    convert_s, peak = run["wall_s"], run["peak_rss_bytes"]
    report = json.loads((out / "moe_lowrank_report.json").read_text())
    result = {
        "machine": machine(),
        "checkpoint": {**{k: CONFIG[k] for k in ("hidden_size", "moe_intermediate_size", "num_experts")},
                       "layers": a.layers, "bytes": size},
        "command": " ".join(cmd[2:]), "achieved_ratio": report["achieved_ratio"],
        "peak_rss_bytes": peak, "peak_rss_over_checkpoint": round(peak / size, 4), "target": 0.35,
        "build_s": round(build_s, 1), "convert_s": round(convert_s, 1), "convert_cpu_s": round(run["cpu_s"], 1),
    }
    (ROOT / "benchmarks" / "results" / "convert_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"checkpoint {size / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB = {peak / size:.3f}× "
          f"(target < 0.35×), convert {convert_s:.0f} s")
    if not a.keep:
        shutil.rmtree(WORK)


if __name__ == "__main__":
    main()
