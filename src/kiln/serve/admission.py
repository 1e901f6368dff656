"""Admission control: a bounded number of sequences in the server, so overload is a 429, not an
out-of-memory crash or an unbounded queue."""

from __future__ import annotations

from kiln.serve.protocol import APIError

RETRY_AFTER_S = 1


class AdmissionGate:
    """Counts the sequences (requests x n) admitted; past `max_running + max_queue`, refuses."""

    def __init__(self, max_running: int, max_queue: int):
        assert max_running >= 1 and max_queue >= 0
        self.max_running = max_running
        self.max_queue = max_queue
        self.in_flight = 0
        self.draining = False

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_queue

    @property
    def waiting(self) -> int:
        """Admitted sequences beyond what the engine runs at once."""
        return max(0, self.in_flight - self.max_running)

    def acquire(self, num_seqs: int) -> None:
        """Admit `num_seqs` sequences or raise the APIError that says why not (400/429/503)."""
        if self.draining:
            raise APIError(
                503, "the server is shutting down", type="service_unavailable",
                code="draining", headers={"Retry-After": str(RETRY_AFTER_S)},
            )  # fmt: skip
        if num_seqs > self.capacity:
            raise APIError(
                400,
                f"the request asks for {num_seqs} sequences; this server admits at most "
                f"{self.capacity} at once",
                param="n",
            )
        if self.in_flight + num_seqs > self.capacity:
            raise APIError(
                429,
                f"the server is at capacity ({self.in_flight} sequences in flight, "
                f"{self.max_queue} may wait); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.in_flight += num_seqs

    def release(self, num_seqs: int) -> None:
        self.in_flight -= num_seqs
        assert self.in_flight >= 0, self.in_flight
