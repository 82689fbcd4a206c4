"""Where the converter writes, and how it publishes: it deletes only what it wrote.

* ``check_paths`` (before any work): an output (or ``--export-dense``) must not be, contain or lie inside the input
  checkpoint or the other output; an existing folder must be empty, or a previous output of ours (recognised by
  its marker file) with ``--overwrite``. Anything else is refused, ``--overwrite`` or not.
* ``Staging``: the temporary folder, ``OUT.moe-convert-tmp`` beside a new output, or ``OUT/.moe-convert-tmp``
  inside an existing one (an empty folder, a mount point or a symlink — a Docker volume — cannot be renamed over,
  and its filesystem is the one with the space). It holds an exclusive ``fcntl`` lock for the whole run, so a
  second converter on the same output (or a ``--resume`` of a live run) fails at once naming the running pid.
* ``Staging.publish``: a new output is one atomic rename; into an existing folder the files are renamed one by
  one (same filesystem). A failure leaves the temporary folder in place with its progress, and ``--resume``
  finishes the publication.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

CONVERT_TMP = ".moe-convert-tmp"  # the converter's temporary folder: OUT.moe-convert-tmp or OUT/.moe-convert-tmp
EXPORT_TMP = ".export-tmp"  # --export-dense's
INNER_NAMES = (CONVERT_TMP, EXPORT_TMP)
LOCK_NAME = ".moe-convert.lock"
STATE_NAME = ".state"  # the pipeline's progress folder inside the temporary folder
MANIFEST = "publish.json"  # in STATE_NAME: the files being moved into an existing output folder


RESUME_HINT = "free space or fix permissions, then rerun with --resume (the completed layers are kept)"


@contextmanager
def writing(path: Path, hint: str = RESUME_HINT) -> Iterator[None]:
    """Turn a failed write (disk full, read-only filesystem, permissions; torch and safetensors raise their own
    types) into an OutputError naming the file."""
    from safetensors import SafetensorError

    try:
        yield
        return
    except OutputError:
        raise
    except (OSError, RuntimeError, SafetensorError) as err:
        if isinstance(err, OSError) and err.strerror:
            reason = err.strerror
        else:  # torch.save says "enforce fail at inline_container.cc", safetensors "IoError(...)"
            reason = f"{str(err).splitlines()[0][:160]}; {_free(path)} free on that filesystem"
    # raised outside the except block: the failed writer's frames (and its open file) are not kept alive
    raise OutputError(f"{path}: cannot write ({reason}); {hint}")


def _free(path: Path) -> str:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 1e6:.1f} MB"
    except OSError:
        return "unknown space"


def _relation(a: Path, b: Path) -> str | None:
    """How resolved path ``a`` relates to ``b``: 'is', 'contains', 'lies inside' or None."""
    if a == b:
        return "is"
    if b.is_relative_to(a):
        return "contains"
    if a.is_relative_to(b):
        return "lies inside"
    return None


def _entries(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n not in skip)


def check_paths(source: Path, outputs: dict[str, tuple[Path, str]], overwrite: bool) -> None:
    """``outputs``: flag -> (folder, marker file that identifies a previous output of ours). Raises OutputError
    before anything is read or written."""
    src = source.resolve()
    resolved = {flag: out.resolve() for flag, (out, _) in outputs.items()}
    for flag, (out, marker) in outputs.items():
        rel = _relation(resolved[flag], src)
        if rel:
            raise OutputError(f"{flag} {out} {rel} the input checkpoint {source}; write the output elsewhere")
        for other, (out2, _) in outputs.items():
            if other < flag and (rel := _relation(resolved[flag], resolved[other])):
                raise OutputError(f"{flag} {out} {rel} {other} {out2}; give the two outputs separate folders")
        check_replaceable(out, marker, overwrite, flag)


def check_replaceable(out: Path, marker: str, overwrite: bool, flag: str) -> None:
    """An existing ``out`` must be empty, a previous output (``marker`` inside) with --overwrite, or hold only
    what an interrupted publication of ours left (the files its manifest lists, beside our temporary folder)."""
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{flag} {out}: a symlink to {os.readlink(out)}, which does not exist; create the "
                          "target folder or remove the link")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{flag} {out}: exists and is not a folder; choose another path")
    content = [n for n in _entries(out) if not n.startswith(INNER_NAMES) and n not in _published(out)]
    if not content:
        return
    if marker not in content:
        raise OutputError(f"{flag} {out}: folder is not empty and was not written by moe-convert (no {marker}); "
                          f"refusing to replace it{' even with --overwrite' if overwrite else ''}: choose an "
                          "empty or new folder")
    if not overwrite:
        raise OutputError(f"{flag} {out}: holds a previous moe-convert output; pass --overwrite to replace it")


def _published(out: Path) -> set[str]:
    """Names an interrupted in-place publication into ``out`` may already have moved there."""
    names: set[str] = set()
    for inner in INNER_NAMES:
        manifest = out / inner / STATE_NAME / MANIFEST
        if manifest.is_file():
            names.update(json.loads(manifest.read_text()))
    return names


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


class Staging:
    """The locked temporary folder of one output (see the module docstring)."""

    def __init__(self, final: Path, inner: str):
        """``inner``: the temporary folder's name inside an existing output; beside a new one it is
        ``OUT<inner>`` (e.g. ``out.moe-convert-tmp``)."""
        self.final = final
        sibling = final.with_name(final.name + inner)
        self.inplace = final.is_dir() and not sibling.exists()  # an empty folder, mount point, symlink, old output
        self.dir = final / inner if self.inplace else sibling
        self._lock = None

    # ----- lock ---------------------------------------------------------------------------------------------
    def running_pid(self) -> int | None:
        """The pid of a live converter holding this output's lock, else None (takes no lock)."""
        lock = self.dir / LOCK_NAME
        if not lock.is_file():
            return None
        with open(lock) as f:  # read-only: works on a read-only filesystem too
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                text = f.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(f, fcntl.LOCK_UN)
        return None

    def refuse_if_running(self) -> None:
        pid = self.running_pid()
        if pid is not None:
            who = f"pid {pid}" if pid > 0 else "another process"
            raise OutputError(f"{self.final}: another moe-convert ({who}) is writing this output right now "
                              f"(lock {self.dir / LOCK_NAME}); wait for it to finish or stop it, then --resume")

    def _take_lock(self, folder: Path) -> None:
        f = open(folder / LOCK_NAME, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            self.refuse_if_running()
            raise OutputError(f"{self.final}: another moe-convert is writing this output right now") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock = f

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ----- create / reuse -----------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.dir.exists()

    def is_ours(self) -> bool:
        """The temporary folder was made by moe-convert (lock file or progress inside), or is empty."""
        return not os.listdir(self.dir) or (self.dir / LOCK_NAME).exists() or (self.dir / STATE_NAME).exists()

    def create(self) -> None:
        """Make the locked temporary folder: made and locked under a private name, then renamed into place, so a
        concurrent converter either sees no folder or a locked one."""
        private = self.dir.with_name(f"{self.dir.name}.{os.getpid()}")
        with writing(self.dir, "choose a writable output folder"):
            if private.exists():
                _remove(private)
            private.mkdir(parents=True)
            self._take_lock(private)
            try:
                os.rename(private, self.dir)
            except OSError as err:
                self.release()
                shutil.rmtree(private, ignore_errors=True)
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    self.refuse_if_running()
                    raise OutputError(f"{self.dir}: created by another process meanwhile; rerun") from None
                raise

    def reuse(self, clear: bool) -> None:
        """Lock an existing temporary folder (--resume), emptied first when ``clear`` (--overwrite)."""
        if not self.is_ours():
            raise OutputError(f"{self.dir}: exists but was not made by moe-convert; remove or rename it")
        with writing(self.dir):
            self._take_lock(self.dir)
            if clear:
                for name in _entries(self.dir, skip=(LOCK_NAME,)):
                    _remove(self.dir / name)

    # ----- publish ------------------------------------------------------------------------------------------
    def publish(self, marker: str) -> None:
        """Move the finished files to ``final``, then drop the temporary folder and the lock. ``marker`` (the
        file that identifies a complete output) is removed first from an old output and moved last. Safe to
        call again after a failure (the manifest in the progress folder lists what is being published)."""
        with writing(self.final):
            if not (self.final.exists() or self.final.is_symlink()):
                os.replace(self.dir, self.final)  # one atomic rename; the lock file travels along
                self.dir = self.final
            else:
                manifest = self.dir / STATE_NAME / MANIFEST
                if manifest.is_file():
                    names = json.loads(manifest.read_text())
                else:
                    names = sorted(_entries(self.dir, skip=(LOCK_NAME, STATE_NAME)), key=lambda n: n == marker)
                    manifest.parent.mkdir(exist_ok=True)
                    manifest.write_text(json.dumps(names))
                inner = self.dir.name if self.inplace else None
                for name in _entries(self.final, skip=(marker, inner)):  # the previous output's other files
                    if name not in names:
                        _remove(self.final / name)
                if (self.dir / marker).exists() and (self.final / marker).exists():
                    (self.final / marker).unlink()  # from here on the folder is no complete output
                for name in names:
                    if (self.dir / name).exists():
                        if (self.final / name).is_dir():
                            _remove(self.final / name)
                        shutil.move(self.dir / name, self.final / name)  # a rename on one filesystem
            shutil.rmtree(self.dir / STATE_NAME, ignore_errors=True)
            (self.dir / LOCK_NAME).unlink(missing_ok=True)
            if self.dir != self.final:
                self.dir.rmdir()
        self.release()

    def discard(self) -> None:
        """Remove the temporary folder (a run that wrote nothing worth resuming)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()


def open_staging(final: Path, inner: str, resume: bool, overwrite: bool, fingerprint: dict, make_state):
    """The locked temporary folder of a conversion and its progress (``make_state(folder)``, with a ``data`` dict
    and ``save()``): new, resumed (same settings only), or cleared (--overwrite)."""
    staging = Staging(final, inner)
    try:
        if staging.exists():
            staging.refuse_if_running()
            if resume:
                staging.reuse(clear=False)
                state = make_state(staging.dir)
                old = state.data.get("fingerprint")
                if old is None:
                    raise OutputError(f"{staging.dir}: holds no saved progress, so there is nothing to resume; "
                                      "pass --overwrite to start over")
                if old != fingerprint:
                    diff = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
                    raise OutputError(f"{staging.dir}: --resume refused: the interrupted run used different "
                                      f"settings ({', '.join(diff)}); rerun with the same ones, or --overwrite to "
                                      "start over")
                return staging, state
            if not overwrite:
                raise OutputError(f"{staging.dir}: an interrupted conversion is there; pass --resume to continue "
                                  "it or --overwrite to start over")
            staging.reuse(clear=True)
        else:
            staging.create()
        state = make_state(staging.dir)
        state.data["fingerprint"] = fingerprint
        state.save()
    except BaseException:
        staging.release()
        raise
    return staging, state
