"""One set of path rules for every file a run reads or writes, and the one-step commit.

Inputs (the model, its external data files, the data, a report to render) must be
regular files (or, for data, a folder of them): a FIFO, device or socket is refused
before it is opened, so no read blocks or grows without bound.

Destinations (the output model, the ``OUT.data`` file it may write, the report, a
rendered page) must not be any input or each other, must not exist unless
``force`` (and then must be a regular file, never a link, device, FIFO or folder),
and must have a name of at most 255 bytes in a writable folder.

:class:`Commit` stages every destination in a hidden ``.onnxfbp-<pid>-*`` folder
next to it, then places them all with signals held: without ``force`` by
``os.link`` (atomic and exclusive: two concurrent runs to one output cannot both
succeed), with ``force`` by ``os.replace`` after keeping a link to the old file.
Any failure before the last placement removes what was placed and restores what
was replaced; a pending SIGINT/SIGTERM/SIGHUP aborts the commit the same way. A
staging folder names its owner's pid: one left by a dead process (SIGKILL) is
removed by the next run that writes the same destination.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import OnnxfbpError, OutputError

__all__ = [
    "NAME_MAX",
    "Commit",
    "check_destination",
    "check_distinct",
    "check_input_file",
    "held_signals",
    "remove_stale_staging",
]

NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows filesystems
STAGING_PREFIX = ".onnxfbp-"
_OWNER = "owner"
_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a symbolic link",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return "the name holds a NUL byte" if "null" in str(exc).lower() else str(exc)


def check_input_file(path: str | os.PathLike[str], what: str,
                     error: type[OnnxfbpError] = OnnxfbpError, *, folder_ok: bool = False) -> Path:
    """``path`` (links followed) as a readable regular file (or a folder if
    ``folder_ok``); else ``error`` with one line saying what it is instead."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; check the path") from None
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {what} {path} ({_os_reason(exc)}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        if folder_ok:
            return path
        raise error(f"{what} {path} is a folder; pass the file itself")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is {_kind(st.st_mode)}, not a regular file; "
                    "pass a regular file (copy the stream to a file first)")
    return path


def check_destination(path: str | os.PathLike[str], what: str, force: bool,
                      advice: str = "choose another path") -> Path:
    """Refuse, before any work, a destination that cannot be written as asked: a
    name over 255 bytes, an existing file without ``force``, anything but a regular
    file (a link, device, FIFO, socket or folder) even with ``force``, a missing or
    unwritable folder."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise OutputError(f"{what} {path} is a folder; give a file name")
    try:
        encoded = os.fsencode(path.name)
    except UnicodeError:
        encoded = path.name.encode("utf-8", "surrogateescape")
    if b"\0" in encoded:
        raise OutputError(f"{what} {path!r} holds a NUL byte; give a plain file name")
    # Staged files keep their names; the longest one written is OUT.data.
    if len(encoded) > NAME_MAX:
        raise OutputError(f"{what} name {path.name[:40]}... is {len(encoded)} bytes, over the "
                          f"filesystem's {NAME_MAX}; choose a shorter name")
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOTDIR:
            probe = path.parent
            while probe != probe.parent and not probe.is_file():
                probe = probe.parent
            raise OutputError(f"cannot write {what} {path}: {probe} is a file, not a folder; "
                              f"{advice}") from None
        raise OutputError(f"cannot write {what} {path} ({_os_reason(exc)}); {advice}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{what} {path} is a folder; give a file name inside it")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{what} {path} is {_kind(st.st_mode)}; onnxfbp only replaces "
                              f"regular files: {advice}")
        if not force:
            raise OutputError(f"{what} {path} already exists; pass --force to overwrite it")
    parent = path.parent
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"cannot write {what} {path}: {probe} is a file, not a folder")
    check_writable_folder(parent, f"{what} {path}", advice)
    return path


def check_writable_folder(parent: Path, what: str, advice: str) -> None:
    """Refuse a missing or unwritable folder by really creating (and removing) a
    temporary folder in it: permission bits alone lie for root and for /proc."""
    import tempfile  # noqa: PLC0415

    if not parent.is_dir():
        raise OutputError(f"cannot write {what}: folder {parent} does not exist; create it first")
    try:
        with held_signals():
            os.rmdir(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    except OSError as exc:
        raise OutputError(
            f"cannot write {what}: folder {parent} is not writable "
            f"({exc.strerror or exc}); {advice}"
        ) from exc


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name the same file, or would (links and spellings resolved)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, ValueError, RuntimeError):
        return os.path.abspath(a) == os.path.abspath(b)


def check_distinct(destinations: Sequence[tuple[Path, str]],
                   sources: Sequence[tuple[Path, str]]) -> None:
    """Refuse a destination that is a source (model, its external data, data) or
    another destination: one line naming both."""
    for i, (dest, what) in enumerate(destinations):
        for src, src_what in sources:
            if _same(dest, src):
                raise OutputError(f"{what} {dest} is also the model, data or output path "
                                  f"(it would overwrite {src_what}); give it its own file name")
        for other, other_what in destinations[:i]:
            if _same(dest, other):
                raise OutputError(f"{what} {dest} is also the model, data or output path "
                                  f"({other_what}); give it its own file name")


def model_files(model: Path) -> list[tuple[Path, str]]:
    """The model and the external data files its header names (cheap: no weights read
    beyond the header's own file)."""
    files = [(model, f"the input model {model}")]
    try:
        import onnx  # noqa: PLC0415

        header = onnx.load(str(model), load_external_data=False)
    except Exception:  # an unreadable model is reported by load_model
        return files
    seen: set[str] = set()
    for tensor in header.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location and location not in seen:
            seen.add(location)
            files.append((model.parent / location,
                          f"{location} (the external data of {model.name})"))
    return files


def data_files(data: Path | None, what: str = "data") -> list[tuple[Path, str]]:
    """The data file, or the arrays and shards of a data folder."""
    if data is None:
        return []
    if not data.is_dir():
        return [(data, f"the {what} file {data}")]
    try:
        names = [p for p in data.iterdir() if p.suffix in (".npy", ".npz")]
    except OSError:
        names = []
    return [(data, f"the {what} folder {data}")] + [(p, f"{p.name} in the {what} folder")
                                                    for p in names]


# ---------------------------------------------------------------------------- signals

_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if hasattr(signal, "SIGHUP") \
    else (signal.SIGINT, signal.SIGTERM)


class _Pending:
    def __init__(self) -> None:
        self.signals: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.signals)


@contextmanager
def held_signals() -> Iterator[_Pending]:
    """Hold SIGINT / SIGTERM / SIGHUP for a short critical section.

    A signal that arrives inside is recorded (the yielded object is true then) and
    re-raised as soon as the section ends, through the handler installed before, so
    a set of renames, or the removal of a staging folder, is never cut in half.
    Outside the main thread (where handlers cannot be set) it holds nothing."""
    pending = _Pending()
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.signals.append(signum)

    for sig in _HELD:
        handler = signal.getsignal(sig)
        if handler is None or handler in (signal.SIG_IGN, signal.SIG_DFL):
            continue  # ignored, default (kills: nothing to clean up) or set outside Python
        previous[sig] = signal.signal(sig, hold)
    try:
        yield pending
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending.signals:
            signal.raise_signal(pending.signals[0])


class _Aborted(Exception):
    pass


# ---------------------------------------------------------------------------- commit

def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(destinations: Iterable[Path]) -> list[Path]:
    """Remove staging folders left next to ``destinations`` by dead processes (their
    ``owner`` file names the pid and the destination); return what was removed."""
    removed = []
    wanted: dict[Path, set[str]] = {}
    for dest in destinations:
        wanted.setdefault(Path(os.path.abspath(dest.parent)), set()).add(dest.name)
    for folder, names in wanted.items():
        try:
            entries = [e for e in folder.iterdir() if e.name.startswith(STAGING_PREFIX)]
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_symlink() or not entry.is_dir():
                    continue
                lines = (entry / _OWNER).read_text(encoding="utf-8",
                                                   errors="surrogateescape").split("\n")
                pid = int(lines[0])
            except (OSError, ValueError, IndexError):
                continue
            if set(lines[1:]) & names and not _alive(pid):
                with held_signals():
                    shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


class Commit:
    """Files staged next to their destinations, placed together or not at all.

    ``stage(dest)`` returns the path to write ``dest``'s content to; ``commit()``
    places every staged file (in the order staged; stage the main file last);
    ``close()`` (or leaving the ``with`` block) removes the staging folders and
    anything staged but not committed."""

    def __init__(self, force: bool) -> None:
        self.force = force
        self._folders: dict[Path, Path] = {}
        self._staged: list[tuple[Path, Path]] = []
        self._main: set[Path] = set()
        self.committed = False

    def __enter__(self) -> Commit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _folder(self, parent: Path) -> Path:
        key = Path(os.path.abspath(parent))
        if key not in self._folders:
            import tempfile  # noqa: PLC0415

            with held_signals():
                folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-",
                                               dir=parent))
                self._folders[key] = folder
            (folder / _OWNER).write_text(str(os.getpid()) + "\n", encoding="utf-8")
        return self._folders[key]

    def stage(self, dest: str | os.PathLike[str], main: bool = False) -> Path:
        """Where to write ``dest`` (a file of its name in its staging folder, whose
        owner file names it). ``main`` files are placed last (the model: readers
        that see it find its data file and the report already in place)."""
        dest = Path(dest)
        folder = self._folder(dest.parent)
        try:
            with open(folder / _OWNER, "a", encoding="utf-8", errors="surrogateescape") as f:
                f.write(dest.name + "\n")
        except OSError as exc:
            raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from None
        staged = folder / dest.name
        self._staged.append((staged, dest))
        if main:
            self._main.add(staged)
        return staged

    def add(self, staged: Path, dest: Path) -> None:
        """Place an extra file written into a staging folder (e.g. ``OUT.data``)."""
        self._staged.append((staged, dest))

    def commit(self) -> None:
        """Place every staged file that exists, or none (OutputError; a pending
        signal is re-raised after everything placed was taken back)."""
        placed: list[tuple[Path, Path | None]] = []  # (dest, backup of the old file)
        with held_signals() as pending:
            try:
                order = sorted(self._staged, key=lambda sd: sd[0] in self._main)
                for staged, dest in order:
                    if not staged.exists():
                        continue
                    if pending:
                        raise _Aborted()
                    placed.append((dest, self._place(staged, dest)))
                if pending:  # a signal before the run's end: take everything back
                    raise _Aborted()
                self.committed = True
            except (_Aborted, OSError, OnnxfbpError) as exc:
                for dest, backup in reversed(placed):
                    try:
                        if backup is not None:
                            os.replace(backup, dest)
                        else:
                            os.unlink(dest)
                    except OSError:
                        pass
                if isinstance(exc, _Aborted):
                    return  # the held signal is raised when the section ends
                if isinstance(exc, OnnxfbpError):
                    raise
                dest = placed[-1][0] if placed else self._staged[-1][1]
                raise OutputError(f"cannot write {dest}: {exc.strerror or exc}; "
                                  "nothing was written") from None

    def _place(self, staged: Path, dest: Path) -> Path | None:
        try:
            st: os.stat_result | None = os.lstat(dest)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                raise OutputError(f"{dest} is {_kind(st.st_mode)}; onnxfbp only replaces "
                                  "regular files; nothing was written")
            if not self.force:
                raise OutputError(f"{dest} appeared while this run was working (another run?); "
                                  "nothing was written; pass --force to overwrite it")
            backup: Path | None = staged.with_name(staged.name + ".old")
            try:
                os.link(dest, backup)  # type: ignore[arg-type]
            except OSError:  # no hard links on this filesystem: the old file cannot come back
                backup = None
            os.replace(staged, dest)
            return backup
        try:
            os.link(staged, dest)  # exclusive: fails if another run created dest meanwhile
        except FileExistsError:
            raise OutputError(f"{dest} appeared while this run was working (another run?); "
                              "nothing was written; pass --force to overwrite it") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # no hard links here (some network/FUSE filesystems): exclusive create, then rename
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            os.replace(staged, dest)
        return None

    def close(self) -> None:
        with held_signals():
            for folder in self._folders.values():
                shutil.rmtree(folder, ignore_errors=True)
            self._folders.clear()
