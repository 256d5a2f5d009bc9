"""The ``mfac`` command: the demo on bundled data, training (resumable) and pruning with built-in
models, and the benchmarks' quick mode. ``python -m mfac`` is the same program.

    mfac demo [--out DIR] [--quick] [--seed N]
    mfac train --model mlp --data digits --optimizer mfac --steps 500 --out DIR
    mfac train --resume DIR                      # continue a run that was stopped or killed
    mfac prune --model mlp --data digits --checkpoint DIR/model.safetensors --sparsity 0.9 --out DIR2
    mfac prune --gradual --steps 200 --out DIR3  # prune while training; mfac prune --resume DIR3 continues it
    mfac bench [--benchmarks DIR]                # needs a source checkout's benchmarks/ folder

Exit status: 0 success; 2 bad usage (found before any work: arguments, files, the output folder);
1 a failure while running (one line on stderr; a training run that diverged says so);
130 Ctrl-C, at any moment until the status is decided. Set MFAC_DEBUG=1 to see tracebacks instead.

One module per command (``demo``, ``train``, ``prune``, ``bench``), each with ``run(args)``;
``parser`` is the grammar. The helpers the commands share are split by concern: ``errors`` (the two
kinds of error), ``tasks`` (data and built-in models), ``optimizers`` (with the models' recipes),
``budget`` (memory and checkpoint size, checked before training), ``output`` (the ``--out``
folder, staged on its own file system), ``reports`` (report.json, report.md and plots),
``pruning_progress``, ``text`` and ``labels`` (text data, Hugging Face models and their heads);
``prune_jobs`` and ``prune_gradual`` (``--gradual`` and ``--resume``) serve ``prune``. The parser imports no command module and no command module imports the
parser: ``main`` parses, then runs the module of the subcommand.
This module imports nothing heavy: torch is loaded inside ``main``, where Ctrl-C is handled.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

__all__ = ["main", "run_program"]

INTERRUPTED = 130


def _interrupted() -> int:
    print("mfac: interrupted; nothing half-written was left behind", file=sys.stderr, flush=True)
    return INTERRUPTED


class _InterruptFlag:
    """Records a Ctrl-C even where a library swallows the KeyboardInterrupt (some imports catch
    BaseException), so the command still ends with status 130.

    Inside ``deferred()`` a Ctrl-C is only recorded: a KeyboardInterrupt raised in the middle of
    importing torch can leave its C++ side half set up (seen here as an abort, status -6), so
    ``_main`` loads the library first (about a second) and then honours the Ctrl-C."""

    def __init__(self):
        self.seen = False
        self.previous = None
        self._deferring = False

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signal handling alone
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.seen = True
        if not self._deferring:
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self.seen:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def main(argv=None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit status."""
    with _InterruptFlag() as interrupt:
        try:
            code = _main(argv, interrupt)
        except KeyboardInterrupt:
            return _interrupted()
        return _interrupted() if interrupt.seen else code


def _main(argv, interrupt: _InterruptFlag) -> int:
    if interrupt.seen:
        raise KeyboardInterrupt
    with interrupt.deferred():
        from .errors import CliError, RunError
        from .parser import build_parser
    args = build_parser().parse_args(argv)
    with interrupt.deferred():
        from . import bench, demo, prune, train
    run = {"demo": demo.run, "train": train.run, "prune": prune.run, "bench": bench.run}[args.command]
    debug = bool(os.environ.get("MFAC_DEBUG"))
    try:
        return run(args)
    except CliError as error:  # the subcommand's name, as argparse's own errors give it
        if debug:
            raise
        print(f"mfac {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except Exception as error:  # a failure while running: one line, status 1
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, RunError):
            message = f"{message} ({type(error).__name__})"
        print(f"mfac {args.command}: error: {message}", file=sys.stderr)
        return 1


def run_program() -> None:
    """Entry point of the installed ``mfac`` script and of ``python -m mfac``: runs ``main`` and
    exits with its status. A Ctrl-C that arrives, or is still pending, once ``main`` has returned
    ends the process with 130 too, without a traceback. Once the status is decided, Ctrl-C is
    ignored: during the interpreter's own shutdown (up to a second with torch loaded) CPython would
    otherwise put back the default action and die of the signal (status -2) after finished work.

    After an interruption the process leaves with ``os._exit(130)``: once a KeyboardInterrupt has
    passed through certain interpreter paths (an import, ``exec``), CPython ends a normal exit by
    killing itself with SIGINT (status -2) even though the exception was handled."""

    def exit_now(signum, frame):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)

    signal.signal(signal.SIGINT, exit_now)  # what main's own handler hands back to when it returns
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # runs exit_now first if a Ctrl-C is pending
    if code == INTERRUPTED:
        os._exit(INTERRUPTED)
    sys.exit(code)
