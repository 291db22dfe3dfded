"""Event sequencing, the sans-I/O part protocol.connection drives on each side: the
supervisor's backlog of unacknowledged events, and the switchboard's duplicate filter.

Sequencing in one paragraph: the supervisor numbers its events 1, 2, 3, ... and never
reuses a number, across reconnects too. It keeps every event until the switchboard
acknowledges it. On (re)connect the switchboard's Welcome says the highest seq it has
stored; the supervisor forgets everything up to that and resends the rest, in order. The
switchboard stores an event only if its seq is above the highest one stored, so a resent
event is never applied twice. A supervisor that restarted with an empty backlog continues
numbering after the Welcome's `last_seq`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from itertools import islice

from . import codec
from .messages import Event


class EventBacklog:
    """The supervisor's events not yet acknowledged, oldest first.

    Items are (seq, encoded frame). The backlog only counts; waiting for room is up to
    the I/O layer, which asks `has_room()` before adding output.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.last_seq = 0
        self._items: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        #: Events reported before the first Welcome, in order; None once numbering is known.
        self._held: list[Event] | None = []
        #: Highest seq ever sent, over all connections: sending one at or below it is a resend.
        self.highest_sent = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def has_room(self) -> bool:
        return self._bytes < self.max_bytes

    def next_seq(self) -> int:
        """Reserve the next sequence number."""
        self.last_seq += 1
        return self.last_seq

    def report(self, event: Event) -> None:
        """Number an event and keep it until acknowledged. Before the first Welcome it is
        held unnumbered instead: a fresh process doesn't know where numbering goes on (its
        recovered runs report before the Welcome says what is stored)."""
        if self._held is not None:
            self._held.append(event)
            return
        event.seq = self.next_seq()
        self.append(event.seq, codec.encode(event))

    @property
    def holding(self) -> bool:
        """True until the first Welcome: reported events wait unnumbered."""
        return self._held is not None

    @property
    def held(self) -> Sequence[Event]:
        """The events held unnumbered until the first Welcome, in order."""
        return self._held or ()

    def sent(self, seq: int) -> bool:
        """Event `seq` went out; True if it had gone out before (a resend)."""
        if seq <= self.highest_sent:
            return True
        self.highest_sent = seq
        return False

    def append(self, seq: int, frame: bytes) -> None:
        # Numbers in the backlog are contiguous: frames_after() relies on it.
        if self._items and seq != self._items[-1][0] + 1:
            raise ValueError(f"seq {seq} does not follow {self._items[-1][0]}")
        self._items.append((seq, frame))
        self._bytes += len(frame)

    def acknowledge(self, seq: int) -> int:
        """Forget every event with seq <= `seq`; return how many were dropped."""
        dropped = 0
        while self._items and self._items[0][0] <= seq:
            self._bytes -= len(self._items.popleft()[1])
            dropped += 1
        return dropped

    def acknowledged_through(self, seq: int) -> bool:
        """True once every event numbered up to `seq` is acknowledged (forgotten)."""
        return not self._items or self._items[0][0] > seq

    def resume(self, stored_seq: int) -> None:
        """Apply a Welcome's `last_seq`: forget what is stored, continue numbering after it
        (the events held until the first Welcome are numbered now, in order)."""
        self.acknowledge(stored_seq)
        self.last_seq = max(self.last_seq, stored_seq)
        held, self._held = self._held, None
        for event in held or ():
            self.report(event)

    def pending(self, after: int = 0) -> Iterator[tuple[int, bytes]]:
        """Events with seq > `after`, in order."""
        for seq, frame in self._items:
            if seq > after:
                yield seq, frame

    def frames_after(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` events with seq > `after`, in order (a copy: safe to send from
        while events are added or acknowledged)."""
        if not self._items:
            return []
        start = max(0, after - self._items[0][0] + 1)
        return list(islice(self._items, start, start + limit))


class InboundSequence:
    """The switchboard's view of one supervisor's event numbers."""

    def __init__(self, stored_seq: int) -> None:
        self.stored_seq = stored_seq

    def is_new(self, seq: int) -> bool:
        """True if `seq` has not been stored yet (a resent event is not)."""
        return seq > self.stored_seq

    def stored(self, seq: int) -> None:
        """Record that every event up to `seq` is durable."""
        if seq > self.stored_seq:
            self.stored_seq = seq
