"""Progress of a conversion in ``<tmp>/.state`` (what ``--resume`` continues from): the layers done with their
specs, reports and shard names, the plan of a plan-pass method, and the calibration hidden states entering the next
layer to run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import write_json
from .output import STATE_NAME, writing


class State:
    """Progress of a conversion in ``<tmp>/.state``: done layers, their specs and reports, the plan, hidden states."""

    def __init__(self, tmp: Path):
        self.dir = tmp / STATE_NAME
        with writing(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / "progress.json"
        self.data: dict[str, Any] = json.loads(self.file.read_text()) if self.file.is_file() else {"layers": {}}

    def save(self) -> None:
        """Write progress.json, then drop hidden-state files it no longer names (a kill at any point leaves the
        file that the saved progress names)."""
        write_json(self.data, self.file)
        keep = f"hidden-{self.data['hidden_for']:05d}.pt" if "hidden_for" in self.data else None
        for f in self.dir.glob("hidden-*.pt"):
            if f.name != keep:
                with writing(f):
                    f.unlink(missing_ok=True)

    def save_hidden(self, hidden: list[torch.Tensor], layer: int) -> None:
        """Write the hidden states entering ``layer`` (hidden-LAYER.pt); the next ``save`` records them together
        with whatever else changed (e.g. the layer just written: one atomic step)."""
        tmp = self.dir / "hidden.pt.tmp"
        with writing(tmp):
            torch.save(hidden, tmp)
            os.replace(tmp, self.dir / f"hidden-{layer:05d}.pt")
        self.data["hidden_for"] = layer

    def load_hidden(self) -> tuple[list[torch.Tensor] | None, int]:
        """(hidden states, the layer they enter) of the last save, or (None, 0)."""
        if "hidden_for" not in self.data:
            return None, 0
        f = self.dir / f"hidden-{self.data['hidden_for']:05d}.pt"
        return torch.load(f, weights_only=True), self.data["hidden_for"]
