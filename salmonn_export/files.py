"""Writing folders atomically: build in a temporary sibling, rename into place only when complete.

Outputs get ordinary permissions: folders `0o777 & ~umask`, files `0o666 & ~umask` (executables keep
their x bits), whatever the writers inside used (onnx writes external data 0600), so a bundle built
by one user can be run by another.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import stat
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from salmonn_export.errors import SalmonnError, SalmonnWarning


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it straight back
    os.umask(mask)
    return mask


def normalize_modes(root: Path, umask: int | None = None) -> None:
    """Give `root` and everything below it umask-respecting modes (symlinks are left alone).

    Folders and executables get `0o777 & ~umask`, other files `0o666 & ~umask`.
    """
    umask = current_umask() if umask is None else umask
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        executable = stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR
        os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def os_problem(exc: OSError) -> str:
    """A short reason for an OSError met while writing ("cannot write here: Permission denied")."""
    return f"cannot write here: {exc.strerror or exc}"


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return parent
    return Path(path.anchor or "/")


def _check_parent(path: Path, what: str) -> None:
    """The parent chain of `path` holds no file; missing folders are created (SalmonnError otherwise)."""
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise SalmonnError(f"cannot write the {what} here: {ancestor} is a file, not a folder", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SalmonnError(f"cannot create the parent folder of the {what} ({exc.strerror or exc})", path) from None


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Check, before any work, that a file can be written at `path`: it is not a folder, no file stands
    in its parent chain (missing parent folders are created) and a probe file can be created beside it
    (read-only file systems, permissions, /proc). Raises one SalmonnError naming `path`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SalmonnError(f"is a folder, not a file (give a file path for the {what})", path)
    _check_parent(path, what)
    probe = path.with_name(f".{path.name}.probe-{secrets.token_hex(4)}")
    try:
        with open(probe, "x"):
            pass
    except OSError as exc:
        raise SalmonnError(os_problem(exc), path) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if path.exists() and not os.access(path, os.W_OK) and os.geteuid() != 0:
        raise SalmonnError("cannot write here: Permission denied (the file is read-only)", path)
    return path


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Check that a folder can be created or replaced at `path`: it is not an existing file and its parent
    chain holds no file (missing parent folders are created) and a folder can be created beside it.
    Raises one SalmonnError naming `path`."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise SalmonnError(f"is a file, not a folder (the {what} must be a folder)", path)
    _check_parent(path, what)
    probe = path.with_name(f".{path.name}.probe-{secrets.token_hex(4)}")
    try:
        probe.mkdir()
    except OSError as exc:
        raise SalmonnError(os_problem(exc), path) from None
    with contextlib.suppress(OSError):
        probe.rmdir()
    return path


def _owner_tag() -> str:
    """`<host>-<pid>` of this process, as its temporary folders' names carry it."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _remove_stale_building_dirs(out: Path) -> None:
    """Remove `.NAME.building-<host>-<pid>-XXXXXXXX` siblings of `out` whose process, on this host, is
    gone: a build killed outright (the OOM killer's SIGKILL, a power cut) cannot clean up after itself,
    and at real size its folder holds gigabytes (a 3B fp32 bundle: 17 GB). Folders of live processes
    and of other hosts (a shared disk) are left alone."""
    host = socket.gethostname().replace("-", "_")
    for tmp in out.parent.glob(f".{out.name}.building-*"):
        parts = tmp.name[len(f".{out.name}.building-"):].split("-")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"removed {tmp}: left by a build (process {pid}) that was killed before it could clean up",
                      SalmonnWarning, stacklevel=3)


def _building_dir(out: Path) -> Path:
    """A new empty sibling `.NAME.building-<host>-<pid>-XXXXXXXX`, created with the umask's mode (mkdtemp
    forces 0700); stale ones of killed processes are removed first (`_remove_stale_building_dirs`)."""
    _remove_stale_building_dirs(out)
    for _ in range(100):
        tmp = out.with_name(f".{out.name}.building-{_owner_tag()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {out}")


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success it replaces `out` with umask-respecting
    permissions (`normalize_modes`), on any error (Ctrl-C and SIGTERM in the CLI included) it is
    removed and `out` is left as it was.

    Without `force`, an existing non-empty `out` is an error.
    """
    out = Path(out).expanduser().resolve()
    check_output_dir(out, what)
    if out.exists() and any(out.iterdir()) and not force:
        raise SalmonnError(f"{what} already exists and is not empty (use --force to replace it)", out)
    try:
        tmp = _building_dir(out)
    except OSError as exc:
        raise SalmonnError(f"cannot write the {what} here ({exc.strerror or exc})", out) from None
    try:
        yield tmp
        normalize_modes(tmp)
        try:
            if out.exists():
                trash = out.with_name(f".{out.name}.old-{time.time_ns()}")
                out.rename(trash)
                tmp.rename(out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                tmp.rename(out)
        except OSError as exc:
            raise SalmonnError(f"cannot put the {what} in place ({exc.strerror or exc})", out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a hidden sibling temp file renamed into place: readers
    see the old file or the new one, never a half-written one; the temp file is removed on any error
    (Ctrl-C and SIGTERM in the CLI included). The file gets the umask's mode (0o666 & ~umask).

    A path that cannot take a file (a folder, a missing or read-only place) is one SalmonnError
    naming it (`check_output_file`); missing parent folders are created."""
    path = check_output_file(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise SalmonnError(os_problem(exc), path) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def cache_root() -> Path:
    """The user cache folder (demo model, quantization cache): `SALMONN_EXPORT_CACHE`, else the platform's
    user cache dir. Here, not in model/demo.py, so that finding it imports no torch."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("SALMONN_EXPORT_CACHE") or user_cache_dir("salmonn-export"))
