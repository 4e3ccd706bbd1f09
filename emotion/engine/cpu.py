"""CPU time by thread role: what bounds one server process apart from the model.

Counted for the whole process, as ``time.process_time()`` is: the decode pool and the
inference thread are the process's, whichever engine or backend ran them.
"""

from __future__ import annotations

import contextlib
import threading
import time

_spent = {"decode": 0.0, "inference": 0.0}
_lock = threading.Lock()


def timed(role: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its thread's CPU time counted under ``role``. Thread CPU
    time, not wall time: waiting for the GIL costs none (spinning on a CUDA sync does, and
    is counted)."""
    started = time.thread_time()
    try:
        return fn(*args, **kwargs)
    finally:
        spent = time.thread_time() - started
        with _lock:
            _spent[role] += spent


def cpu_seconds(loop_thread: int | None = None) -> dict[str, float]:
    """CPU time this process has spent: in all (``process``, torch's own threads included),
    by role, and on the thread ``loop_thread`` (an event loop's) while it lives."""
    with _lock:
        out = {"process": time.process_time(), **_spent}
    getclock = getattr(time, "pthread_getcpuclockid", None)  # not on macOS
    if loop_thread is not None and getclock is not None:
        with contextlib.suppress(OSError):  # the loop's thread has ended
            out["event_loop"] = time.clock_gettime(getclock(loop_thread))
    return {k: round(v, 4) for k, v in out.items()}
