"""Print the headline numbers of a converted checkpoint's moe_lowrank_report.json.

    python scripts/show_report.py OUT_DIR_OR_REPORT_JSON

Scalar fields are printed, the usual headline ones first; nested sections are only named (see the file itself).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPORT = "moe_lowrank_report.json"
FIRST = ("method", "target_ratio", "achieved_ratio", "expert_params_before", "expert_params_after")


def summary(report: dict) -> list[str]:
    keys = [k for k in FIRST if k in report] + sorted(k for k in report if k not in FIRST)
    lines, nested = [], []
    for key in keys:
        value = report[key]
        if isinstance(value, (dict, list)):
            nested.append(f"{key} ({len(value)} entries)")
        elif isinstance(value, float):
            lines.append(f"  {key}: {value:.6g}")
        else:
            lines.append(f"  {key}: {value}")
    if nested:
        lines.append(f"  also: {', '.join(nested)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    path = Path(args[0])
    if path.is_dir():
        path = path / REPORT
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"show_report: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    if not isinstance(report, dict):
        print(f"show_report: {path} is not a JSON object", file=sys.stderr)
        return 1
    print(f"{path}:")
    print("\n".join(summary(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
