"""The studio's CPU thread policy: the server and its jobs share the cores explicitly, never oversubscribe them.

PyTorch's intra-op pool spins a thread per core by default. Two such processes on the same cores (the
Streamlit server timing a model while a training job runs) fight for every core: a batch-1 forward measured
798 ms with 2 threads against 5.8 ms with 1 on a 2-core machine with a job running (5.6 ms idle). So:

- the *budget* is the cores this process may use (its CPU affinity), capped by ``OMP_NUM_THREADS`` when the
  user set it (that is the user saying how many cores the studio gets);
- a new job gets what the running jobs and the server leave: ``budget - 1`` (one core stays with the server)
  minus the threads of the jobs already running, at least 1, so several jobs end up with 1 thread each;
- the server uses the budget minus the running jobs' threads (at least 1): all cores while idle, one core
  beside a job that has the rest.

A user setting (the sidebar's "Threads per job", or ``threads`` given to :func:`studio.jobs.submit`) replaces
the job share; ``0``/None means the policy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .errors import StudioError

SERVER_RESERVE = 1  # cores kept for the server (and the browser) while jobs train
SERVER_ENV = "STUDIO_SERVER"  # "1" in the studio server's process (app.py): jobs it starts leave it a core


def budget() -> int:
    """The cores the studio may use: this process's CPU affinity, capped by ``OMP_NUM_THREADS`` if set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    return max(1, n)


def check_threads(threads: int | None) -> int | None:
    """``threads`` as given by a user: None/0 (the policy) or a whole number ≥ 1; anything else is refused."""
    if threads is None or threads == 0:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise StudioError(
            f"Threads must be a whole number of at least 1 (or 0 for automatic), not {threads!r}."
        )
    return threads


def job_threads(
    running: Iterable[int] = (),
    *,
    server: bool = True,
    cores: int | None = None,
    nproc: int = 1,
    asked: int | None = None,
) -> int:
    """Threads for each process of a new job.

    Args:
        running: the thread counts of the jobs already running (each process's).
        server: whether the studio's server runs beside it (it keeps :data:`SERVER_RESERVE` cores).
        cores: the budget (default :func:`budget`).
        nproc: processes of the new job (torchrun): the share is split between them.
        asked: the user's setting, which wins when given.
    """
    asked = check_threads(asked)
    if asked is not None:
        return asked
    cores = budget() if cores is None else cores
    free = cores - (SERVER_RESERVE if server else 0) - sum(running)
    return max(1, free // max(1, nproc))


def server_threads(running: Iterable[int] = (), *, cores: int | None = None) -> int:
    """Threads for the server's own work (analyses, inline prunes, timing) beside the running jobs."""
    cores = budget() if cores is None else cores
    return max(1, cores - sum(running))
