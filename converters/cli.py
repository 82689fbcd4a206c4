"""``moe-convert``: compress the routed experts of a HuggingFace MoE checkpoint into the moe_lowrank format."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

# Before torch loads OpenMP: with the default spin-waiting, a float64 SVD slows by 100x as soon as another process
# competes for the cores (measured: 512x1024 SVD, 2 cores, load 11: 48 s spinning vs 0.4 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pydantic import ValidationError  # noqa: E402

from vllm_moe_lowrank.format import FormatError  # noqa: E402

from .errors import ConvertError  # noqa: E402
from .method import METHODS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="moe-convert",
        description="Compress MoE experts (low-rank / shared-basis / sparse) into a checkpoint vLLM serves with "
                    "--quantization moe_lowrank.",
        epilog="Method options: -o KEY=VALUE (repeatable); a wrong key lists the valid ones. "
               "Example: moe-convert --method mobe --ratio 0.3 ckpt/ out/ --calib-data calib.txt",
    )
    ap.add_argument("checkpoint", type=Path, help="HuggingFace checkpoint folder (safetensors)")
    ap.add_argument("output", type=Path, help="output folder (written via OUTPUT.moe-convert-tmp, then renamed)")
    ap.add_argument("--method", required=True, choices=list(METHODS))
    ap.add_argument("--ratio", type=float, required=True,
                    help="fraction of routed-expert parameters to remove, in (0, 1)")
    ap.add_argument("-o", "--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                    help="method-specific option")
    cal = ap.add_argument_group("calibration")
    cal.add_argument("--calib-data", type=Path, help="calibration text: .txt, .jsonl (text field) or .parquet")
    cal.add_argument("--text-field", default="text", help="field/column holding the text (jsonl, parquet)")
    cal.add_argument("--num-samples", type=int, default=128)
    cal.add_argument("--seq-len", type=int, default=512)
    cal.add_argument("--seed", type=int, default=42)
    cal.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward batch")
    cal.add_argument("--propagate", default="compressed", choices=["compressed", "dense"],
                     help="hidden states fed to the next layer: the compressed layer's output (default) or the "
                          "original's")
    cal.add_argument("--gram-weight", default="routing", choices=["routing", "none"],
                     help="weight each expert's Grams by its squared routing weight (Σ g²·x xᵀ; default) or not")
    cal.add_argument("--shrink", default="smooth", choices=["smooth", "cliff"],
                     help="Gram shrinkage toward the layer mean: smooth in the token count for every expert "
                          "(default) or only experts with fewer tokens than dimensions (old rule)")
    cal.add_argument("--down-fit", default="compressed", choices=["compressed", "dense"],
                     help="fit down on the compressed gate/up's intermediates (default) or on the original's")
    ap.add_argument("--factor-dtype", "--dtype", dest="factor_dtype", default="auto",
                    choices=["auto", "bfloat16", "float16", "float32", "fp8_e4m3"],
                    help="dtype of the written factors; fp8_e4m3 adds float32 per-row scales (auto: fp8_e4m3 for an "
                         "FP8 checkpoint, else the checkpoint's float dtype)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] for calibration and fitting")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="let transformers run the checkpoint's own config/tokenizer code (e.g. Kimi-K2's tokenizer)")
    ap.add_argument("--export-dense", type=Path, metavar="DIR",
                    help="also write a plain HF checkpoint with the reconstructed dense experts")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and a memory estimate; write nothing")
    ray = ap.add_argument_group("Ray cluster (pip install 'vllm-moe-lowrank[ray]'; docs/distributed.md)")
    ray.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
                     help="fit layers as Ray tasks on a running cluster (ADDRESS, e.g. head:6379) or, with auto, "
                          "the one in $RAY_ADDRESS else a new local one; byte-identical output. With --dry-run: the "
                          "task graph and a wall-time estimate")
    ray.add_argument("--ray-transfer", default="path", choices=["path", "object-store"],
                     help="how a task gets its layer's experts: read from CHECKPOINT on a filesystem every node "
                          "sees (path, default) or sent through Ray's object store")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted conversion")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return ap


def _bytes_line(report: dict) -> str:
    b = report.get("bytes") or {}
    if not b:
        return ""
    return (f"routed-expert bytes ({report.get('factor_dtype', '?')} factors): {b['source_expert_bytes']:,} -> "
            f"{b['expert_bytes']:,} ({b['expert_bytes_ratio']:.3f}x the source, {b['expert_bytes_vs_bf16']:.3f}x "
            f"bf16); checkpoint {b['source_checkpoint_bytes']:,} -> {b['checkpoint_bytes']:,} "
            f"({b['checkpoint_bytes_ratio']:.3f}x)")


def _summary(report: dict) -> str:
    lines = [f"method {report['method']}  target ratio {report['target_ratio']}  "
             f"achieved ratio {report['achieved_ratio']:.4f}",
             f"routed-expert params: {report['expert_params']['original']:,} -> {report['expert_params']['kept']:,}",
             _bytes_line(report),
             f"{'layer':>5}  {'status':<10}  {'gate err':>8}  {'up err':>8}  {'down err':>8}  {'out err':>8}"]
    for layer, r in report["layers"].items():
        if r.get("status") != "compressed":
            if "tokens_per_expert" in r:
                lines.append(f"{layer:>5}  {'dense':<10}")
            continue
        w = r["weight_rel_err"] or {}  # None when units are reordered (RS-MoE): only the output error applies
        errs = [f"{w[p]:8.4f}" if p in w else f"{'-':>8}" for p in ("gate", "up", "down")]
        out = r.get("output_rel_err")
        lines.append(f"{layer:>5}  {'compressed':<10}  {'  '.join(errs)}  {'-' if out is None else f'{out:8.4f}':>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .pipeline import REPORT_NAME, ConvertOptions, convert, dry_run

    raw = vars(args).copy()
    is_dry = raw.pop("dry_run")
    raw["command"] = "moe-convert " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        opts = ConvertOptions(**raw)
        if is_dry:
            print(json.dumps(dry_run(opts), indent=2))
            return
        report = convert(opts)
    except ValidationError as err:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in err.errors())
        print(f"moe-convert: error: {problems}", file=sys.stderr)
        sys.exit(2)
    except (ConvertError, FormatError, OSError) as err:  # FormatError: a written checkpoint failed verification
        print(f"moe-convert: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(_summary(report))
    print(f"written: {opts.output} (report: {opts.output / REPORT_NAME})")


if __name__ == "__main__":
    main()
