"""``moe-eval`` command line: ppl, layer-error, compare."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _write(result: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def _local_paths(a: argparse.Namespace) -> None:
    """Checkpoints are local folders and text files exist: a missing path is an error here, never a model-hub id
    that transformers or vLLM would try to download."""
    folders = {"checkpoint": getattr(a, "checkpoint", None), "--reference": getattr(a, "reference", None)}
    for what, path in folders.items():
        if path is not None and not (Path(path) / "config.json").is_file():
            state = "has no config.json" if Path(path).is_dir() else "does not exist"
            raise FileNotFoundError(f"{what} {path}: {state}; give a local checkpoint folder (model-hub ids are not "
                                    "fetched)")
    for run in getattr(a, "runs", None) or []:
        if not Path(run).exists():
            raise FileNotFoundError(f"RUN {run}: does not exist (a result .json or a checkpoint folder)")
    text = getattr(a, "text", None)
    if text is not None and not Path(text).is_file():
        raise FileNotFoundError(f"--text {text}: file not found")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moe-eval", description="Evaluate dense or moe_lowrank checkpoints")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("ppl", help="held-out perplexity on fixed windows",
                       description="Held-out perplexity: the first --max-tokens tokens of --text in --window-token "
                                   "windows, each scored on its own. Backend auto: vLLM prompt logprobs (what is "
                                   "served) when vLLM is installed, else transformers (float32; a compressed "
                                   "checkpoint is materialized to a dense export first).")
    p.add_argument("checkpoint")
    p.add_argument("--text", required=True, help="held-out text file")
    p.add_argument("--window", type=_positive, default=256)
    p.add_argument("--max-tokens", type=_positive, default=16384)
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    p.add_argument("--compile", action="store_true", help="vllm backend: compiled mode instead of enforce_eager")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", help="also write the result as JSON to this file")

    l = sub.add_parser("layer-error", help="per-layer relative error of compressed MoE layers vs the dense model",
                       description="Streams the dense --reference layer by layer on held-out text and reports, per "
                                   "MoE layer, the routed-expert output error on the dense model's activations "
                                   "(moe) and the decoder-layer output error with the compressed layers in place "
                                   "(hidden, accumulated).")
    l.add_argument("checkpoint", help="compressed (moe_lowrank) checkpoint")
    l.add_argument("--reference", required=True, help="the dense checkpoint it was converted from")
    l.add_argument("--text", required=True, help="held-out text file")
    l.add_argument("--window", type=_positive, default=256)
    l.add_argument("--max-tokens", type=_positive, default=4096)
    l.add_argument("--batch-size", type=_positive, default=8, help="windows per forward")
    l.add_argument("--device", default="cpu")
    l.add_argument("--json", action="store_true")
    l.add_argument("--out", help="also write the result as JSON to this file")

    c = sub.add_parser("compare", help="table (markdown + JSON) and PNG plot of perplexity vs ratio per method",
                       description="RUN: a result file (benchmarks/results/quality_*.json, moe-eval ppl --out JSON) "
                                   "or a checkpoint folder (measured with --text).")
    c.add_argument("runs", nargs="+", metavar="RUN")
    c.add_argument("--out-dir", default=".", help="where NAME.md, NAME.json and NAME.png go (default: .)")
    c.add_argument("--name", default="comparison")
    c.add_argument("--text", help="held-out text, to measure checkpoint folders that have no recorded perplexity")
    c.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    c.add_argument("--variants", default="default", choices=["default", "all"],
                   help="default: each method's default configuration only; all: ablation variants too (dashed)")
    c.add_argument("--title")
    return ap


def main(argv: list[str] | None = None) -> None:
    from vllm_moe_lowrank.converters.errors import ConvertError

    a = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local checkpoints only: never reach the network
    try:
        _local_paths(a)
        if a.cmd == "ppl":
            from .perplexity import is_compressed, perplexity, resolve_backend

            if a.json:  # keep standard output for the result: vLLM's own log handler writes there
                os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
            if a.backend == "auto" and resolve_backend("auto") == "transformers" and is_compressed(a.checkpoint):
                print("moe-eval ppl: vLLM is not installed; scoring the materialized dense export with transformers "
                      "(the same function, not the served compute path)", file=sys.stderr)

            r = perplexity(a.checkpoint, a.text, a.window, a.max_tokens, a.backend, enforce_eager=not a.compile)
            _write(r, a.out)
            print(json.dumps(r) if a.json else f"{r['checkpoint']}: ppl {r['ppl']:.4f} over {r['tokens']} tokens "
                  f"({r['windows']} windows of {r['window']}, {r['backend']})")
        elif a.cmd == "layer-error":
            from .layer_error import format_table, layer_errors

            r = layer_errors(a.checkpoint, a.reference, a.text, a.window, a.max_tokens, a.batch_size, a.device)
            _write(r, a.out)
            print(json.dumps(r) if a.json else format_table(r))
        else:
            from .compare import compare

            r = compare(a.runs, a.out_dir, a.name, a.text, a.backend, a.variants, a.title)
            print(r["markdown"])
            print("\nwritten: " + ", ".join(r["files"]))
    except (ValueError, OSError, ConvertError) as err:  # FormatError is a ValueError, CheckpointError a ConvertError
        print(f"moe-eval {a.cmd}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
