"""
Writing a file so that a crash, a kill or a full disk leaves the old version or the new one,
never half of one: write a temporary twin, flush it to disk, then rename it over the target (a
rename within a folder is atomic). Checkpoints, config.json, metrics, plots, evaluation
results, Hugging Face exports and prepared datasets all go through here.
"""

import contextlib
import fcntl
import os
import socket
import time

from errors import UserError


@contextlib.contextmanager
def atomic_write(path, mode="w", tmp=None, **open_args):
    """`with atomic_write(path) as f:` writes f to path whole, or not at all. tmp: the twin's
    name (default path + '.tmp'). An exception inside the block (or a failed write) removes
    the twin and leaves path as it was, then propagates."""
    tmp = tmp or f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_folder(os.path.dirname(os.path.abspath(path)))  # make the rename itself durable


def fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_locks = {}  # folder -> the open file whose lock this process holds


def lock_folder(folder, what):
    """Take an exclusive lock on folder (its .lock file) for this process, or stop with one line
    naming the process that holds it: two runs writing one out_dir (a requeued job beside workers
    that outlived their torchrun, two commands into one new folder) would interleave metrics and
    overwrite each other's checkpoints. The lock goes with the process (a kill releases it too);
    taking it again in the same process is a no-op. Creates folder."""
    folder = os.path.abspath(folder)
    if folder in _locks:
        return
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{folder} is in use by {holder}; wait for it to end (or stop it) before {what} there, "
                        f"or choose another folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode())
    _locks[folder] = fd


def unlock_folder(folder):
    fd = _locks.pop(os.path.abspath(folder), None)
    if fd is not None:
        os.close(fd)  # (closing the file releases the lock)
