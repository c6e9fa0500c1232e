"""Failpoints: let a fault test kill the worker at one named point (kill -9 of itself).

`TENANTTUNE_FAILPOINTS=deploy_model.published` makes the worker die right after a publish and
before the activity reports completion — the window no outside `kill` can hit reliably. Unset
(always, outside fault tests) a failpoint costs one environment lookup.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "TENANTTUNE_FAILPOINTS"
log = logging.getLogger(__name__)


def hit(name: str) -> None:
    if name in os.environ.get(ENV, "").split(","):
        log.warning("failpoint %s: killing this process (pid %d)", name, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
