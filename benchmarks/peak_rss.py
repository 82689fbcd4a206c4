"""Run ``python -m MODULE ...`` or ``python -c CODE ...`` and write its own peak RSS (bytes) to a file.

    python benchmarks/peak_rss.py OUT_FILE -m vllm_moe_lowrank.converters.cli --method svd ...

Why not ``wait4``/``getrusage``: Linux carries a process's RSS high-water mark through fork and exec into the
child's ``ru_maxrss``, so a child started by a large parent (a pytest session, a script that just built a 5 GB
checkpoint) reports the parent's peak. ``VmHWM`` in ``/proc/self/status`` belongs to the current address space
only, i.e. to what ran after exec.
"""

from __future__ import annotations

import atexit
import runpy
import sys


def own_peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main() -> None:
    out, mode, target, *args = sys.argv[1:]
    atexit.register(lambda: open(out, "w").write(str(own_peak_rss_bytes())))
    if mode == "-m":
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif mode == "-c":
        sys.argv = ["-c", *args]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(f"peak_rss.py: expected -m MODULE or -c CODE, got {mode!r}")


if __name__ == "__main__":
    main()
