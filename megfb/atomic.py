"""Outputs that never destroy anything: atomic writes, output checks, unique new files.

- `atomic_output(path)`: write to a temporary beside the target, rename only on success, so a
  crash, Ctrl-C/SIGTERM or a failed check never leaves a half-written file under the final name.
  Temporaries are named `.<name>.<pid>-<random>.tmp`; one whose process is gone (SIGKILL, power
  loss) is removed by the next write into that folder (`sweep_stale`) and by `megfb clean`.
- `check_output(path, inputs, force)`: run BEFORE any work, so a bad output place costs one
  line, not minutes of prediction: a missing folder, a file where a folder should be, a place
  that cannot be written, an output that is one of the command's own inputs (always refused),
  an existing file (refused unless --force). The project's rolling files (a run's latest.mge,
  log.jsonl, ...) are written with atomic_output directly and are not subject to it.
- `atomic_new_file(path)`: like atomic_output but never replaces anything: the finished file
  takes `path` or, when that name is taken, `stem-2.ext`, `stem-3.ext`, ... (exclusively, so
  two commands finishing in the same second both keep their file).
"""
import contextlib
import errno
import os
import re
import secrets
import tempfile

from .errors import MegfbError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def temp_name(basename, pid=None):
    """The project's temporary name for `basename`: hidden, with the writing process's id."""
    return f".{basename}.{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}.tmp"


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:
        return False
    return True


def stale_temporaries(folder):
    """Temporaries of the project's own naming in `folder` whose writing process is gone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    out = []
    for name in names:
        m = _TEMP.match(name)
        if m and int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid"))):
            out.append(os.path.join(folder, name))
    return out


def sweep_stale(folder):
    """Remove stale temporaries (a killed run's leftovers) from `folder`; returns them."""
    removed = []
    for path in stale_temporaries(folder):
        with contextlib.suppress(OSError):
            if os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)
                removed.append(path)
    return removed


def _mode_for_new_file():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _make_temp(folder, basename):
    while True:
        tmp = os.path.join(folder, temp_name(basename))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _mode_for_new_file())
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path in the target's folder; on success rename it to `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    sweep_stale(folder)
    tmp = _make_temp(folder, os.path.basename(path))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def unique_name(path, n):
    stem, ext = os.path.splitext(path)
    return path if n == 1 else f"{stem}-{n}{ext}"


class NewFile:
    """What atomic_new_file yields: `.tmp` to write, `.path` the final name once it exists."""

    def __init__(self, tmp):
        self.tmp, self.path = tmp, None


@contextlib.contextmanager
def atomic_new_file(path):
    """Write `.tmp`; on success the file appears as `path` (or path-2, path-3, ... when the
    name is taken), never replacing an existing file. The final name is in `.path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    sweep_stale(folder)
    new = NewFile(_make_temp(folder, os.path.basename(path)))
    try:
        yield new
        n = 1
        while True:
            candidate = unique_name(path, n)
            try:
                os.link(new.tmp, candidate)  # atomic and exclusive: fails when the name exists
            except FileExistsError:
                n += 1
                continue
            except OSError as exc:  # a file system without hard links: reserve, then replace
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                try:
                    os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _mode_for_new_file()))
                except FileExistsError:
                    n += 1
                    continue
                os.replace(new.tmp, candidate)
            new.path = candidate
            break
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(new.tmp)


def same_file(a, b):
    """True when a and b are one file (also through a link); by real path when one is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_folder(folder, what="output folder"):
    """One line when `folder` is missing, is a file, or cannot be written (probed by creating
    a temporary there: permission bits say nothing for root or a read-only mount)."""
    folder = os.fspath(folder) or "."
    if not os.path.exists(folder):
        probe = folder
        while probe and not os.path.exists(probe):
            probe, _ = os.path.split(probe.rstrip(os.sep))
        if probe and not os.path.isdir(probe):
            raise MegfbError(f"{what} {folder}: {probe} is a file, not a folder")
        raise MegfbError(f"{what} {folder} does not exist; create it first")
    if not os.path.isdir(folder):
        raise MegfbError(f"{what} {folder} is a file, not a folder")
    try:
        tmp = _make_temp(folder, "write-probe")
    except OSError as exc:
        raise MegfbError(f"{what} {folder} cannot be written ({exc.strerror or exc})") from None
    os.remove(tmp)


def check_output(path, inputs=(), force=False, what="output"):
    """Refuse an output before any work (one line): see the module docstring."""
    path = os.fspath(path)
    if path.endswith(os.sep) or os.path.isdir(path):
        raise MegfbError(f"{what} {path} is a folder; name a file")
    for source in inputs:
        if source is not None and os.path.exists(path) and same_file(path, os.fspath(source)):
            raise MegfbError(f"{what} {path} is also an input of this command ({source}); "
                             "refusing to overwrite it (name another file)")
        if source is not None and os.path.realpath(path) == os.path.realpath(os.fspath(source)):
            raise MegfbError(f"{what} {path} is also an input of this command; name another file")
    check_folder(os.path.dirname(path) or ".", f"{what} folder")
    if os.path.lexists(path) and not force:
        raise MegfbError(f"{what} {path} already exists; pass --force to replace it")
    return path


def temporary_directory(tag):
    """tempfile.TemporaryDirectory named megfb-<tag>-<pid>-...; stale ones (their process gone)
    are removed first."""
    root = tempfile.gettempdir()
    pattern = re.compile(rf"^megfb-{re.escape(tag)}-(\d+)-")
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            m = pattern.match(name)
            if m and not pid_alive(int(m.group(1))):
                import shutil

                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"megfb-{tag}-{os.getpid()}-")
