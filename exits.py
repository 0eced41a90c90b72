"""
How a program of this codebase ends when the world outside it intervenes (a signal, or a disk
that is full, read-only or not where the user said) or its input is wrong.

Every script imports this module first, before torch (whose imports take seconds). From then on:
  - SIGINT (Ctrl-C) or SIGTERM ends the program with one line and exit code 128 + the signal's
    number, instead of a traceback (SIGINT) or a silent death (SIGTERM). Nothing is left
    half-written that a later run would read: checkpoints, Hugging Face exports and config.json
    are written under a temporary name and renamed, and a prepared dataset only counts once its
    meta.json is there.
    During the training loop GracefulStop (below) takes over (finish the step, save, exit 0)
    and hands back to this when the loop ends.
  - a UserError (errors.py: a bad config key, bad data, a missing or foreign checkpoint) that
    reaches the top ends the program with its one `error:` line and exit code 1. Under torchrun
    a bad config key is said by rank 0 alone, a bad file by the first process of each machine.
  - a warning of this codebase's own (a long prompt cropped, ...) prints as one `warning:`
    line, without Python's file and line.
  - running out of memory (a batch_size or vocabulary too large) says how much one tensor asked
    for and what to lower, instead of torch's allocator traceback.
  - an OSError about a file (no space left, permission denied, read-only file system, a folder
    that is a file) that nothing else caught ends the program with one `error:` line naming the
    file and the reason, instead of a traceback.

Both are installed only when one of this folder's scripts is the program being run, so
importing the modules (tests, notebooks) leaves the importer's handling alone.
"""

import os
import signal
import sys
import threading
import warnings

from errors import ConfigError, UserError

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN_PID = os.getpid()


def stop(signum, frame=None, what="nothing was half-written; run the command again to do the work"):
    if os.getpid() != MAIN_PID:  # a worker process (data preparation's pool): its parent reports
        os._exit(128 + signum)
    print(f"stopped by {signal.Signals(signum).name}: {what}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def report_error(kind, error, trace):
    if issubclass(kind, ConfigError) and not first_process():
        return  # the same command, the same verdict: under torchrun rank 0 says it for all
    if issubclass(kind, (UserError, OSError)) and not first_on_machine():
        return  # the same files on one machine, the same verdict: its first process says it
    if issubclass(kind, BrokenPipeError):  # the reader of our output went away (`| head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (or Python's exit flush complains)
        return
    if issubclass(kind, UserError):  # bad input, said for the user by the code that found it
        print(f"error: {error}", file=sys.stderr)
    elif out_of_memory(error):
        print(f"error: out of memory: {out_of_memory(error)}; lower batch_size or block_size (raise "
              f"gradient_accumulation_steps to keep the global batch), use a smaller model or pad_vocab_to, or set "
              f"activation_checkpointing=True", file=sys.stderr)
    elif issubclass(kind, OSError) and error.filename:
        print(f"error: {error.filename}: {error.strerror or error}; free space, fix the permissions, or choose "
              f"another path", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, trace)  # a bug: the traceback is what finds it


def show_warning(message, category, filename, lineno, file=None, line=None):
    """Our own warnings (warnings.warn in this folder's code) as one `warning:` line, without
    Python's file, line number and source line; anyone else's as Python shows them."""
    if os.path.abspath(filename).startswith(HERE + os.sep):
        print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
        python_show_warning(message, category, filename, lineno, file, line)


python_show_warning = warnings.showwarning


def out_of_memory(error):
    """What an allocation that failed asked for (CPU or GPU), or None for any other error."""
    import re
    text = str(error)
    cpu = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    if cpu:
        return f"one tensor needed {int(cpu.group(1)) / 2**30:,.1f} GiB of host memory"
    gpu = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", text)
    return f"one tensor needed {gpu.group(1)} more of GPU memory" if gpu and "out of memory" in text else None


def first_process():
    """Rank 0 under torchrun, or a program run on its own."""
    return os.environ.get("RANK", "0") == "0"


def first_on_machine():
    """The first process of this machine under torchrun (another machine may lack a file this one
    has, so each says its own), or a program run on its own."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def run_as_script():
    program = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return os.path.dirname(os.path.abspath(program)) in (HERE, os.path.join(HERE, "prepare"))


if run_as_script():
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, stop)
    sys.excepthook = report_error
    warnings.showwarning = show_warning


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to finish its step, save, and exit 0 (preemptible clusters).
    A second Ctrl-C stops at once. Outside the loop, exits.py's handlers rule."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            stop(signum, frame, "a second time, so at once, without saving the steps since the last checkpoint")
        self.requested = True

    def agreed(self, world, device, check_now):
        """Whether every process stops after this step. One process: whenever asked. Several:
        they must stop at the same step, so they agree with an all-reduce (one asking is
        enough); that reads a value back to the host, so it happens only where check_now (at
        log and evaluation steps), never every step."""
        if world == 1:
            return self.requested
        if not check_now:
            return False
        import torch
        import torch.distributed as torch_dist
        flag = torch.tensor([float(self.requested)], device=device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return bool(flag.item())
