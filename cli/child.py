"""Run a program that ends with its parent: `python -m cli.child [--unset-prefix P] -- CMD ...`.

The stack's supervisord starts every program through this: on Linux the program gets SIGTERM
when supervisord dies (PR_SET_PDEATHSIG survives the exec), so even a `kill -9` of the process
manager leaves no Temporal, API or worker running on its own. `--unset-prefix TEMPORAL_` keeps
the caller's client settings away from the `temporal` binary, which reads them too.
"""

from __future__ import annotations

import os
import signal
import sys

PARENT = os.getppid()  # read first: a parent that dies later is caught below
PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    prefix = ""
    if argv[:1] == ["--unset-prefix"]:
        prefix, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m cli.child [--unset-prefix PREFIX] -- COMMAND [ARG ...]")
    env = {k: v for k, v in os.environ.items() if not (prefix and k.startswith(prefix))}
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != PARENT:  # the parent died before prctl took effect
            sys.exit(1)
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main(sys.argv[1:])
