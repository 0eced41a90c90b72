"""
How a program of this codebase ends when the world outside it intervenes: a signal, or a disk
that is full, read-only or not where the user said.

Every script imports this module first, before torch (whose imports take seconds). From then on:
  - SIGINT (Ctrl-C) or SIGTERM ends the program with one line and exit code 128 + the signal's
    number, instead of a traceback (SIGINT) or a silent death (SIGTERM). Nothing is left
    half-written that a later run would read: checkpoints, Hugging Face exports and config.json
    are written under a temporary name and renamed, and a prepared dataset only counts once its
    meta.json is there.
    During the training loop plumbing.GracefulStop takes over (finish the step, save, exit 0)
    and hands back to this when the loop ends.
  - an OSError about a file (no space left, permission denied, read-only file system, a folder
    that is a file) that nothing else caught ends the program with one `error:` line naming the
    file and the reason, instead of a traceback.

Both are installed only when one of this folder's scripts is the program being run, so
importing the modules (tests, notebooks) leaves the importer's handling alone.
"""

import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN_PID = os.getpid()


def stop(signum, frame=None, what="nothing was half-written; run the command again to do the work"):
    if os.getpid() != MAIN_PID:  # a worker process (data preparation's pool): its parent reports
        os._exit(128 + signum)
    print(f"stopped by {signal.Signals(signum).name}: {what}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def report_file_error(kind, error, trace):
    if issubclass(kind, OSError) and error.filename:
        print(f"error: {error.filename}: {error.strerror or error}; free space, fix the permissions, or choose "
              f"another path", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, trace)  # a bug: the traceback is what finds it


def run_as_script():
    program = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return os.path.dirname(os.path.abspath(program)) in (HERE, os.path.join(HERE, "prepare"))


if run_as_script():
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, stop)
    sys.excepthook = report_file_error
