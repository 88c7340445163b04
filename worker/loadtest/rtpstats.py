"""What a probe phone counts of the RTP stream it receives, sans-I/O: loss by sequence numbers,
the pacing of the packets (each inter-arrival time against the 20 ms they should be apart), and
the RFC 3550 interarrival jitter. Arrival times are passed in."""

from __future__ import annotations

from media.rtp import seq_diff, ts_diff

FRAME_S = 0.020


class ReceiveStats:
    """One received stream. ``on_packet`` for every packet, in arrival order.

    ``pacing_deviations_s``: for each packet that came right after its predecessor in sequence,
    ``|inter-arrival - 20 ms|``. ``lost``: packets between the first and the highest sequence
    number that never came."""

    __slots__ = (
        "_last_arrival",
        "_last_ext",
        "_last_timestamp",
        "_seen",
        "clock_rate",
        "duplicates",
        "first_ext",
        "frame_s",
        "highest_ext",
        "jitter_s",
        "pacing_deviations_s",
        "received",
    )

    def __init__(self, clock_rate: int = 8000, frame_s: float = FRAME_S) -> None:
        self.clock_rate = clock_rate
        self.frame_s = frame_s
        self.received = 0
        self.duplicates = 0
        self.first_ext: int | None = None
        self.highest_ext = 0
        self.jitter_s = 0.0
        self.pacing_deviations_s: list[float] = []
        self._seen: set[int] = set()
        self._last_ext = 0
        self._last_arrival = 0.0
        self._last_timestamp = 0

    def on_packet(self, sequence: int, timestamp: int, arrival: float) -> None:
        if self.first_ext is None:
            ext = sequence
            self.first_ext = self.highest_ext = ext
        else:
            ext = self._last_ext + seq_diff(sequence, self._last_ext & 0xFFFF)
            if ext in self._seen:
                self.duplicates += 1
                return
            if ext == self._last_ext + 1:
                self.pacing_deviations_s.append(abs(arrival - self._last_arrival - self.frame_s))
            transit_change = (arrival - self._last_arrival) - (
                ts_diff(timestamp, self._last_timestamp) / self.clock_rate
            )
            self.jitter_s += (abs(transit_change) - self.jitter_s) / 16
            self.highest_ext = max(self.highest_ext, ext)
            self.first_ext = min(self.first_ext, ext)
        self._seen.add(ext)
        self.received += 1
        self._last_ext = ext
        self._last_arrival = arrival
        self._last_timestamp = timestamp

    @property
    def expected(self) -> int:
        return 0 if self.first_ext is None else self.highest_ext - self.first_ext + 1

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.received)
