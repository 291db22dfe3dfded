"""The live feed behind the dashboard: one loop per switchboard process turns what changed in
the store into events, and every open dashboard (GET /api/v1/live) gets them.

The loop reads the store's job change log (filled by triggers, so no code path that changes
a job can forget to tell) soon after each write, looks at supervisors and the lab's devices
at most once a second when a job or a supervisor's record changed (a device's health and
holder change with those), and recomputes the overview when either changed. Work grows
with the rate of change, not with the number of jobs stored or of dashboards open: each
change is read once and its event encoded once.

A dashboard that reads too slowly is not allowed to grow the server's memory: past
SUBSCRIBER_QUEUE waiting events its queue is dropped and replaced by one `resync` event,
after which the dashboard refetches what it shows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple

import msgspec

from switchboard.changes import Changes
from switchboard.hub import Hub
from switchboard.models import JobFilter, SupervisorView
from switchboard.store.base import Store

log = logging.getLogger("switchboard.live")

#: The change log is read soon after a write (after SETTLE_S, so a burst of writes is
#: read at once), and at least every POLL_S.
SETTLE_S = 0.01
POLL_S = 1.0
#: How often supervisors are compared and, if anything changed, the overview recomputed.
SUPERVISORS_EVERY_S = 1.0
#: How often dashboards are told when each connected supervisor was last heard from.
HEARTBEATS_EVERY_S = 5.0
#: The overview is recomputed at least this often (minutes roll over with no change).
OVERVIEW_EVERY_S = 10.0
#: Changes read per pass, and the log entries kept (older ones are pruned).
CHANGES_PER_PASS = 2000
CHANGES_KEPT = 100_000
PRUNE_EVERY_S = 60.0
#: Events one dashboard may have waiting before it is told to resync instead.
SUBSCRIBER_QUEUE = 1000
#: The overview's window: jobs ended per minute over this many minutes, and failures listed.
OVERVIEW_MINUTES = 60
OVERVIEW_FAILURES = 10


class LiveEvent(NamedTuple):
    kind: str  # job, job_deleted, supervisor, device, device_removed, overview, heartbeats, resync
    data: str  # JSON


RESYNC = LiveEvent("resync", "{}")
_CLOSED = LiveEvent("", "")


class Subscriber:
    """One open dashboard's queue of events."""

    def __init__(self, limit: int = SUBSCRIBER_QUEUE) -> None:
        self._queue: asyncio.Queue[LiveEvent] = asyncio.Queue(limit)
        self.resyncs = 0

    def offer(self, event: LiveEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            # Behind: forget what waits, and have the dashboard refetch instead.
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(RESYNC)
            self.resyncs += 1

    async def next(self, timeout_s: float) -> LiveEvent | None:
        """The next event; None after `timeout_s` without one, or once the feed closed."""
        try:
            event = await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return None
        if event is _CLOSED:
            raise EOFError
        return event

    def close(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_CLOSED)


def with_last_heard(view: SupervisorView, hub: Hub) -> SupervisorView:
    """The stored view, with when the supervisor was last heard from if it is connected."""
    heard = hub.last_heard_at(view.id)
    if heard is None:
        return view
    return msgspec.structs.replace(view, last_seen=heard)


class LiveFeed:
    def __init__(self, store: Store, hub: Hub, changes: Changes) -> None:
        self.store = store
        self.hub = hub
        self.changes = changes
        self.subscribers: set[Subscriber] = set()
        self._rev = 0
        self._supervisors: dict[str, bytes] = {}
        self._supervisor_writes = -1
        #: A pass over supervisors and devices is due (something changed since the last).
        self._fleet_due = True
        self._devices: dict[str, bytes] = {}
        self._overview = b""
        self._closed = False

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber()
        if self._closed:
            subscriber.close()
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def close(self) -> None:
        """End every open event stream (the server is shutting down)."""
        self._closed = True
        for subscriber in self.subscribers:
            subscriber.close()

    def _publish(self, kind: str, data: bytes) -> None:
        event = LiveEvent(kind, data.decode())
        for subscriber in self.subscribers:
            subscriber.offer(event)

    async def run(self) -> None:
        self._rev = await self.store.latest_job_change()
        next_supervisors = next_overview = next_prune = next_heartbeats = 0.0
        seen = self.changes.count
        while True:
            if self.subscribers:
                await self.changes.wait(seen, POLL_S)
                await asyncio.sleep(SETTLE_S)
            else:  # nobody to tell: no reason to wake on every write
                await asyncio.sleep(POLL_S)
            seen = self.changes.count
            now = time.monotonic()
            try:
                if now >= next_prune:
                    next_prune = now + PRUNE_EVERY_S
                    await self.store.prune_job_changes(CHANGES_KEPT)
                jobs_changed = await self._jobs()
                supervisors_changed = False
                # Their load changes with jobs, the rest with a write to their record.
                # Device writes are supervisor writes; a device's holder changes with a job.
                # Remembered until the pass runs: the last change of a burst is not lost.
                touched = jobs_changed or self.store.supervisor_writes != self._supervisor_writes
                self._fleet_due = self._fleet_due or touched
                if now >= next_supervisors and self._fleet_due:
                    next_supervisors = now + SUPERVISORS_EVERY_S
                    self._fleet_due = False
                    self._supervisor_writes = self.store.supervisor_writes
                    supervisors_changed = await self._supervisors_pass()
                    await self._devices_pass()
                if (jobs_changed or supervisors_changed) and self.subscribers:
                    next_overview = min(next_overview, now + SUPERVISORS_EVERY_S)
                if now >= next_overview:
                    next_overview = now + OVERVIEW_EVERY_S
                    await self._overview_pass()
                if now >= next_heartbeats and self.subscribers:
                    next_heartbeats = now + HEARTBEATS_EVERY_S
                    self._heartbeats_pass()
            except Exception:  # keep the feed alive; the next pass retries
                log.exception("live feed pass failed")

    async def _jobs(self) -> bool:
        if not self.subscribers:
            self._rev = await self.store.latest_job_change()
            return False
        changes = await self.store.job_changes(self._rev, CHANGES_PER_PASS)
        if not changes:
            return False
        self._rev = changes[-1].rev
        latest = {change.job_id: change for change in changes}  # last change per job wins
        deleted = [job_id for job_id, change in latest.items() if change.deleted]
        changed = [job_id for job_id, change in latest.items() if not change.deleted]
        if changed:
            found = await self.store.list_jobs(JobFilter(ids=changed, limit=len(changed)))
            for _, summary in sorted(found):  # oldest first, as they were made
                self._publish("job", msgspec.json.encode(summary))
        for job_id in deleted:
            self._publish("job_deleted", msgspec.json.encode({"id": job_id}))
        return True

    async def _supervisors_pass(self) -> bool:
        changed = False
        for view in await self.store.list_supervisors():
            # Heartbeats move last_seen every few seconds: not news worth an event.
            encoded = msgspec.json.encode(msgspec.structs.replace(view, last_seen=None))
            if self._supervisors.get(view.id) != encoded:
                self._supervisors[view.id] = encoded
                changed = True
                self._publish("supervisor", msgspec.json.encode(with_last_heard(view, self.hub)))
        return changed

    async def _devices_pass(self) -> None:
        listed = await self.store.list_devices()
        for view in listed:
            encoded = msgspec.json.encode(view)
            if self._devices.get(view.id) != encoded:
                self._devices[view.id] = encoded
                self._publish("device", encoded)
        for device_id in self._devices.keys() - {view.id for view in listed}:
            del self._devices[device_id]  # its supervisor no longer declares it
            self._publish("device_removed", msgspec.json.encode({"id": device_id}))

    def _heartbeats_pass(self) -> None:
        # Kept out of `supervisor` events (heartbeats would be most of their traffic): one
        # small event now and then says when each connected supervisor was last heard from.
        heard = self.hub.last_heard()
        self._publish("heartbeats", msgspec.json.encode({"at": time.time(), "last_heard": heard}))

    async def _overview_pass(self) -> None:
        if not self.subscribers:
            self._overview = b""  # a new dashboard gets the next one whatever it holds
            return
        overview = await self.store.overview(time.time(), OVERVIEW_MINUTES, OVERVIEW_FAILURES)
        encoded = msgspec.json.encode(overview)
        if encoded != self._overview:
            self._overview = encoded
            self._publish("overview", encoded)
