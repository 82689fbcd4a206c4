"""``moe-eval`` command line."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="moe-eval", description="Evaluate dense or moe_lowrank checkpoints")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ppl", help="held-out perplexity on fixed windows")
    p.add_argument("checkpoint")
    p.add_argument("--text", required=True, help="held-out text file")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--backend", default="transformers", choices=["transformers"])
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = ap.parse_args(argv)
    from .perplexity import perplexity

    r = perplexity(a.checkpoint, a.text, a.window, a.max_tokens, a.backend)
    print(json.dumps(r) if a.json else f"{r['checkpoint']}: ppl {r['ppl']:.4f} over {r['tokens']} tokens "
          f"({r['windows']} windows of {r['window']}, {r['backend']})")


if __name__ == "__main__":
    main()
