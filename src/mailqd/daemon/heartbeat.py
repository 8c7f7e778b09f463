"""How a worker proves to its supervisor that it is alive (gunicorn's WorkerTmp).

The supervisor creates an unlinked temporary file per worker before forking;
the worker touches it (changes its ctime with fchmod) from its event loop; the
supervisor reads the file's ctime and kills a worker whose last beat is older
than `heartbeat_timeout`. A hung event loop stops beating, so it is caught
even when the process is still running.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass


class Heartbeat:
    """One worker's heartbeat file, shared across fork()."""

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="mailqd-hb-")
        os.unlink(path)
        self._fd = fd
        self._mode = 0

    def beat(self) -> None:
        """Called by the worker: mark 'alive now'."""
        self._mode = 1 - self._mode
        os.fchmod(self._fd, self._mode)

    def last_beat(self) -> float:
        """Called by the supervisor: wall-clock time of the last beat (or creation)."""
        return os.fstat(self._fd).st_ctime

    def seconds_since_beat(self) -> float:
        return time.time() - self.last_beat()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """Who a worker is: its slot in the pool and the lease owner name it claims under.

    `owner` is unique per process lifetime (host, supervisor nonce, pid), so the
    supervisor can give back exactly the jobs of a worker that died.
    """

    index: int
    owner: str
