"""Child-process supervision for ``meg up``: a service that dies is restarted with backoff, the others run on.

Backoff: the first restart waits ``backoff_start_s`` (0.5 s), each further crash doubles the wait up to
``backoff_max_s`` (10 s); a service that has run ``reset_after_s`` (a minute) since its last start counts as
healthy again and the wait goes back to the start. Every crash and restart is logged.

Children run in their own process groups, so a Ctrl-C in the terminal reaches only the supervisor, which
then stops them in reverse start order (SIGTERM, then SIGKILL past a deadline); on Linux they are also
told to stop if the supervisor itself dies (``PR_SET_PDEATHSIG``), so a killed ``meg up`` orphans nothing.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("meg.up")

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def describe_exit(code: int | None) -> str:
    """``"status 2"`` or ``"signal SIGKILL"`` for a Popen return code."""
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


@dataclass
class Service:
    """One supervised child: its command and restart bookkeeping."""

    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    restart_due: float | None = None     # set while a crashed service waits out its backoff
    history: list[float] = field(default_factory=list)  # backoffs waited so far, for logs and tests

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Starts ``services`` and keeps them running; call :meth:`tick` periodically, :meth:`stop` at the end."""

    def __init__(self, services: Sequence[Service], *, cwd: Path | None = None, backoff_start_s: float = 0.5,
                 backoff_max_s: float = 10.0, reset_after_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.services = list(services)
        self.cwd = cwd
        self.backoff_start_s = backoff_start_s
        self.backoff_max_s = backoff_max_s
        self.reset_after_s = reset_after_s
        self.clock = clock
        self._force = False
        for svc in self.services:
            svc.backoff_s = backoff_start_s

    def start(self, svc: Service) -> None:
        svc.proc = subprocess.Popen(svc.argv, cwd=self.cwd, process_group=0,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        svc.started_at = self.clock()
        svc.restart_due = None
        log.debug("%s command: %s", svc.name, " ".join(svc.argv))
        log.info("started %s (pid %d)", svc.name, svc.proc.pid)

    def start_all(self) -> None:
        for svc in self.services:
            self.start(svc)

    def exited(self) -> list[Service]:
        """Services whose process has ended (during start-up, a reason to give up rather than restart)."""
        return [s for s in self.services if s.proc is not None and s.proc.poll() is not None]

    def tick(self) -> list[Service]:
        """Notice crashes, restart services whose backoff is over; returns the services restarted now."""
        now = self.clock()
        restarted = []
        for svc in self.services:
            if svc.running():
                if svc.backoff_s > self.backoff_start_s and now - svc.started_at >= self.reset_after_s:
                    log.info("%s has run %.0f s since its restart: restart backoff back to %.1f s", svc.name,
                             now - svc.started_at, self.backoff_start_s)
                    svc.backoff_s = self.backoff_start_s
                continue
            if svc.restart_due is None:
                assert svc.proc is not None
                wait = svc.backoff_s
                svc.history.append(wait)
                svc.restart_due = now + wait
                svc.backoff_s = min(2 * wait, self.backoff_max_s)
                log.error("%s (pid %d) exited with %s after %.1f s; restarting it in %.1f s (the other services "
                          "keep running)", svc.name, svc.proc.pid, describe_exit(svc.proc.returncode),
                          now - svc.started_at, wait)
            elif now >= svc.restart_due:
                svc.restarts += 1
                self.start(svc)
                log.warning("restarted %s (restart %d)", svc.name, svc.restarts)
                restarted.append(svc)
        return restarted

    def _on_second_signal(self, signum: int, frame: object) -> None:
        self._force = True

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop every child: SIGTERM in reverse start order, then SIGKILL past ``timeout_s`` or on a second
        Ctrl-C / SIGTERM (the impatient user's way out)."""
        previous = {s: signal.signal(s, self._on_second_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for svc in reversed(self.services):
                if svc.running():
                    assert svc.proc is not None
                    svc.proc.send_signal(signal.SIGTERM)
                    deadline = time.monotonic() + timeout_s
                    while svc.proc.poll() is None and time.monotonic() < deadline and not self._force:
                        time.sleep(0.05)
                    if svc.proc.poll() is None:
                        log.warning("%s did not stop in time: killing it", svc.name)
                        svc.proc.kill()
                        svc.proc.wait()
                    if svc.proc.returncode not in (0, -signal.SIGTERM):
                        log.warning("%s stopped with %s", svc.name, describe_exit(svc.proc.returncode))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

