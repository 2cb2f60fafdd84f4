"""Work beside the requests: it runs only where they leave a core idle.

Two things compute while requests are served on the same cores and none of them waits for it:
`render --watch` (and `tollway up`'s thread) re-rendering Envoy's files, and a serving
process's warm reader reading an edited manifest (tollway.manifest.reading). Both set their
thread to SCHED_IDLE, which the scheduler counts as idle: a request's waking thread is placed
on a core running it and takes the core at once; merely niced, that core looked busy.
"""

from __future__ import annotations

import os


def yield_to_requests() -> None:
    """Put the calling thread at SCHED_IDLE (where it is the process's only thread, as in
    the reader, the whole process and the children it forks; in `tollway up`, only the
    renderer's thread). Measured with 10,000 projects at 100 requests/s (bench/reload.py):

    - the renderer: the slowest requests away from the services' reloads fell from
      10.4-10.5 ms to 4.8-7.1 ms;
    - the reader: the requests in flight while a reload of one edited organization was read
      and compiled took 4.49 ms at the median instead of the 2.63 of those between reloads;
      with the reader at SCHED_IDLE 2.96-3.06 ms against 2.52-2.70 (niced to 19, 3.22).

    The cost falls where the work saturating the cores shares this thread's cgroup (`tollway
    up`; a container is a cgroup of its own and keeps its share): the work waits for an idle
    moment. An Envoy config edit (a route, a provider) waited 5-12 s for the renderer; a
    services' reload, whose reader has far less to do, took 0.01-0.16 s from noticed to in
    force under wrk at 1,500-1,800 requests/s (YAML, one organization read), and 0.06-0.50 s
    for a JSON manifest, read whole (0.08-0.14 s at normal priority). Where SCHED_IDLE is
    refused (a seccomp profile) or not Linux (a thread has no policy of its own), the
    process is niced."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except (AttributeError, OSError):
        os.nice(10)
