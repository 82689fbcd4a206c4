"""A stand-in for `moe-convert` used by tests/test_demo.py: records argv, writes a config and a report."""

import json
import os
import sys
from pathlib import Path

argv = sys.argv[1:]
Path(os.environ["FAKE_RECORD_DIR"], "convert.argv").write_text(json.dumps(argv))
positional = [a for i, a in enumerate(argv) if not a.startswith("--") and not argv[i - 1].startswith("--")]
out = Path(positional[1])
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "moe_lowrank"}}))
report = {"method": argv[argv.index("--method") + 1], "target_ratio": float(argv[argv.index("--ratio") + 1]),
          "achieved_ratio": 0.30125, "layers": {"0": {}, "1": {}}}
(out / "moe_lowrank_report.json").write_text(json.dumps(report))
print(f"fake moe-convert: wrote {out}")
