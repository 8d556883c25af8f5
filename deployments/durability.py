"""What a stream's owner writes to the session store, and when: at segment rolls and at the end, never per chunk.

A stream's durable state is its last segment boundary: the session checkpoint (`StreamingSession.checkpoint()`),
the committed words, the segment index and the stream sample where the segment starts. A client that lost its
connection resumes from there on any ingress replica, resending the audio from that sample; replay is
deterministic, so the words it already holds come back with the same indices.

A roll whose write fails (the store is unreachable) is not skipped: the newest roll stays pending and is written
again at the next chunk, at most once per `RETRY_INTERVAL_S` (each write carries the whole state, so the newest
supersedes the older ones); meanwhile the stream goes on and resume points lag behind. A write refused because a
newer connection took the session over ends this stream (`StaleOwner`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from deployments.session_store import DurableState, Lease, SessionStore, StoreUnavailable
from pipeline.session import StreamingSession, TranscriptEvent, checkpoint_offset
from protos.qwen3stream.v1 import asr_pb2

log = logging.getLogger(__name__)

#: How often a pending roll is written again while the store is unreachable.
RETRY_INTERVAL_S = 1.0
#: How long a finished session stays resumable. Serve's proxy ends a stream's input alike for a half-close and
#: for a client that went away (the cancel flag can arrive later), so an "end" may be a drop: the client can
#: still resume for this long, then the keys expire.
FINISHED_KEEP_S = 120.0


def store_url(url: str | None) -> str | None:
    """The store's URL: the given one, else `REDIS_URL`; `REDIS_PASSWORD` fills in a URL without a password
    (Kubernetes mounts it from a Secret)."""
    url = url or os.environ.get("REDIS_URL") or None
    password = os.environ.get("REDIS_PASSWORD")
    if url is None or not password:
        return url
    parts = urlsplit(url)
    if parts.password is not None:
        return url
    netloc = f"{quote(parts.username or '')}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class StoreConnection:
    """One store client per ingress replica, connected on first use."""

    def __init__(self, url: str | None, ttl_s: float) -> None:
        self.url, self.ttl_s = url, ttl_s
        self._store: SessionStore | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> SessionStore | None:
        """The store, or None when this server keeps no session state (no URL configured)."""
        if self.url is None:
            return None
        async with self._lock:
            if self._store is None:
                self._store = await SessionStore.connect(self.url, ttl_s=self.ttl_s)
            return self._store


@dataclass
class DurableStream:
    """One stream's lease and its pending roll."""

    store: SessionStore
    lease: Lease
    pending: DurableState | None = None
    last_try: float = 0.0

    async def roll(self, event: TranscriptEvent, session: StreamingSession) -> asr_pb2.Ack | None:
        """Record the roll `event` (its words already sent); the Ack to send, or None while the store is away."""
        assert event.checkpoint is not None, "rolls carry checkpoints"
        words = event.transcript.split()  # the committed words as of the roll (later events may follow it)
        self.pending = DurableState(
            checkpoint=event.checkpoint,
            segment_index=session.segment_index,
            sample_offset=checkpoint_offset(event.checkpoint),
            emitted_words=len(words),
            committed_words=list(words),
        )
        return await self.flush(force=True)

    async def flush(self, force: bool = False) -> asr_pb2.Ack | None:
        """Write the pending roll, if any (retries are spaced by RETRY_INTERVAL_S unless forced)."""
        if self.pending is None or (not force and time.monotonic() - self.last_try < RETRY_INTERVAL_S):
            return None
        self.last_try = time.monotonic()
        state = self.pending
        try:
            await self.store.save_roll(self.lease, state)
        except StoreUnavailable as error:
            log.warning("session %s: roll %d not stored yet (%s); retrying", self.lease.session_id, state.segment_index, error)
            return None
        self.pending = None
        return asr_pb2.Ack(
            durable_sample_offset=state.sample_offset,
            committed_words=state.emitted_words,
            segment_index=state.segment_index,
        )

    async def end(self, finished: bool) -> None:
        """The stream is over: `finished` (its Final was sent) lets its state expire after FINISHED_KEEP_S;
        otherwise (the connection dropped, an error) the lease goes and the state stays for a resume within the
        session TTL."""
        try:
            if finished:
                await self.store.finish(self.lease, keep_s=min(FINISHED_KEEP_S, self.store.ttl_ms / 1000))
            else:
                await self.store.release(self.lease)
        except StoreUnavailable as error:
            log.warning("session %s: could not %s (%s)", self.lease.session_id, "finish" if finished else "release", error)
