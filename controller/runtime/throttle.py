"""A client-side rate limit on API requests: a token bucket, as client-go's.

Why: one command asks the API server about every pod of a trench (a port-forward,
log tails, the agent's certificate, on the first run a PATCH and a watch each):
~150 requests for 48 pods with agents running, ~350 when they are injected, and
10,000 targets would make tens of thousands. kubectl's clients limit themselves
(its discovery client to 50 requests/s with bursts of 300) rather than leave it
all to the server's API Priority and Fairness, whose 429s we also honour
(Retry-After). The bucket is shared by the command's threads and its event loop:
``reserve`` hands out the wait, the caller sleeps it where it runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

QPS = 50.0
BURST = 300


class Throttle:
    """At most ``burst`` requests at once, refilled at ``qps`` per second."""

    def __init__(
        self, qps: float = QPS, burst: int = BURST, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError("qps must be > 0 and burst >= 1")
        self.qps = qps
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token; the seconds to wait before the request may go (0 within the burst)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def wait(self) -> None:
        """Block this thread until a request may go."""
        delay = self.reserve()
        if delay > 0:
            time.sleep(delay)

    async def acquire(self) -> None:
        """Wait on the event loop until a request may go."""
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)
