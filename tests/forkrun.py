"""
Run many short commands of this project's scripts, each in a fork of one process that has
imported torch and the scripts' modules already: a command that stops at its first check then
costs a fork instead of a fresh interpreter importing torch (2-3 s on a 2-core machine, most of
a bad-input case). Each command still runs as its script's __main__ in a process of its own,
with exits.py's handlers installed as a script run gets them, and hands back its exit code,
stdout and stderr.

    python tests/forkrun.py      then one JSON line per command on stdin:
    {"argv": ["train.py", "--batch_size=0"]}  ->  {"code": 1, "stdout": "...", "stderr": "error: ..."}

The parent never runs a torch operation, so no thread pool exists to be broken by fork().
"""

import json
import os
import runpy
import signal
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import exits  # noqa: E402  first, as in every script

import evaluate, explain, finetune, sample, train  # noqa: E402,F401,E401  the slow imports, done once


def run(argv):
    """Fork, run argv as a script in the child; (exit code, stdout, stderr)."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # stdin is the parent's line of requests
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        os._exit(child(argv))
    _, status = os.waitpid(pid, 0)
    out.seek(0), err.seek(0)
    return os.waitstatus_to_exitcode(status), out.read().decode(errors="replace"), err.read().decode(errors="replace")


def child(argv):
    """What `python argv[0] argv[1:]` would do, from here on; returns the exit code."""
    exits.MAIN_PID = os.getpid()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, exits.stop)
    sys.excepthook, warnings.showwarning = exits.report_error, exits.show_warning
    script = os.path.join(ROOT, argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))  # (as the interpreter puts the script's folder first)
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:  # as the interpreter ends: a number is the code, a message is printed
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    return code


if __name__ == "__main__":
    os.chdir(ROOT)
    for line in sys.stdin:
        code, stdout, stderr = run(json.loads(line)["argv"])
        print(json.dumps({"code": code, "stdout": stdout, "stderr": stderr}), flush=True)
