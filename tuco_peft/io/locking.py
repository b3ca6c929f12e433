"""Writing files safely: one writer per results file (an advisory lock held for the whole run), and every
file that is written whole replaced in one rename (``replaced_atomically``).

The lock is ``OUT.lock``, beside the results file rather than the file itself, because sorting the rows
replaces ``OUT`` with a new file (an atomic rename) and a lock on the old one would be lost. The operating
system releases the lock of a process that dies, however it dies, so a lock file left by a killed run is
simply taken over. The holder writes its pid into the file so that a refused run can name it.

On POSIX this is ``flock``, which also separates two opens in one process; on Windows, ``msvcrt.locking``
of one byte far past the pid.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .. import __version__
from ..errors import InputError

# The mark of the files tuco-peft writes whole (see cli.outputs): any version's starts with WRITER.
WRITER = "tuco-peft"
WRITTEN_BY = f"{WRITER} {__version__}"

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

WAIT_POLL_SECONDS = 0.2
_WINDOWS_LOCK_OFFSET = 2**30  # the locked byte: past the pid, which stays readable


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def _try_lock(descriptor: int) -> bool:
    """Take the lock without waiting; False when another open file holds it."""
    if sys.platform == "win32":
        os.lseek(descriptor, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
    else:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def _is_lock_file(path: Path) -> bool:
    """Whether ``path`` is missing or holds what a lock file of tuco-peft holds: nothing, or a pid."""
    if not path.exists():
        return True
    try:
        content = path.read_bytes()[:32].strip() if path.stat().st_size <= 32 else b"?"
    except OSError:
        return False
    return content == b"" or content.isdigit()


def check_lock_file(out: Path) -> None:
    """Refuse to take over ``out``'s lock path when a file tuco-peft did not write sits there."""
    path = lock_path(out)
    if path.is_dir() or not _is_lock_file(path):
        raise InputError(
            f"{path}, the lock file of --out {out}, is a file tuco-peft did not write; move it away or pass another "
            "--out."
        )


@contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """A file beside ``path`` (same folder and suffix) for the block to write, renamed onto ``path`` when the
    block succeeds: a failure or an interruption leaves the old file whole, never half-written."""
    path = Path(path)
    staging = path.with_name(f".{path.stem}.{os.getpid()}.writing{path.suffix}")
    try:
        yield staging
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        with suppress(FileNotFoundError):
            staging.unlink()


def write_text_atomically(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) as the whole of ``path``, replaced in one rename (``replaced_atomically``)."""
    with replaced_atomically(path) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(path)


def _not_writable(out: Path, error: OSError) -> InputError:
    return InputError(f"--out {out} is not writable ({error.strerror or error}); pass another --out.")


def check_writable(out: Path) -> None:
    """Prove ``out`` can be written before any work is done: open it for append (creating it, then removing
    what was created), so that a bad path fails now and not after the model has loaded."""
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; pass a file for the rows.")
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "ab"):
            pass
    except OSError as error:
        raise _not_writable(out, error) from None
    if not existed:
        out.unlink()


@contextmanager
def results_lock(out: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold ``out``'s lock for the block, after proving ``out`` writable.

    Another holder makes this an error naming its pid, or with ``wait`` a wait for it to finish.
    """
    check_lock_file(out)
    check_writable(out)
    path = lock_path(out)
    announced = False
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise _not_writable(out, error) from None
        try:
            locked = _try_lock(descriptor)
        except OSError as error:  # a file system without locks (some network mounts)
            os.close(descriptor)
            raise InputError(
                f"cannot lock {path} ({error.strerror or error}); pass an --out on a local disk."
            ) from None
        if locked:
            if os.path.exists(path) and os.path.samestat(os.fstat(descriptor), os.stat(path)):
                break
            # The holder removed the file as it released it: the lock on the removed file is worth nothing.
        else:
            holder = _holder(path)
            if not wait:
                os.close(descriptor)
                raise InputError(
                    f"--out {out} is being written by another tuco-peft run ({holder}); wait for it to finish, "
                    "pass --wait to start when it does, or pass another --out."
                )
            if not announced:
                print(f"tuco-peft: waiting for {holder} to finish writing {out}", file=sys.stderr)
                announced = True
            time.sleep(WAIT_POLL_SECONDS)
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.lseek(descriptor, 0, os.SEEK_SET)
        os.write(descriptor, str(os.getpid()).encode())
        yield
    finally:
        # Removed before it is released, so that whoever opens the path next makes a new, free lock file.
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(descriptor)
