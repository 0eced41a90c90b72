"""
Writing a file so that a crash, a kill or a full disk leaves the old version or the new one,
never half of one: write a temporary twin, flush it to disk, then rename it over the target (a
rename within a folder is atomic). Checkpoints, config.json, metrics, plots, evaluation
results, Hugging Face exports and prepared datasets all go through here.
"""

import contextlib
import os


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
