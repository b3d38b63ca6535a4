"""The websocket relay: one feed per campaign, shared by every client watching it.

A feed runs one thread that

- follows the campaign's stream when its row names a ``stream_address`` (topics trial,
  proposal, veto, model, command, station), re-reading the address every ``address_every`` seconds
  (a resumed campaign publishes on a new one);
- polls the ledger cheaply every ``poll_every`` seconds (newest trial event id, newest command
  id and how many are pending, how many model versions, the campaign row's status/paused/live),
  so the page updates even when no stream can be reached (a finished campaign, another host);
- can be fed in-process from ``Ledger.listeners`` (:meth:`LiveHub.attach_listeners`), which
  ``labpilot run --console`` uses: no stream needed at all.

Messages are fanned out to each client's bounded asyncio queue with
``loop.call_soon_threadsafe``; a client that does not keep up loses its oldest messages and is
sent ``{"topic": "refresh"}`` (refetch everything), and never slows the campaign or anyone else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator.control import campaign_is_live
from orchestrator.ledger import (
    CampaignRow,
    CommandRow,
    Ledger,
    ModelVersionRow,
    TrialEventRow,
    TrialRow,
)

log = logging.getLogger("labpilot.console")

STREAM_TOPICS = ("trial", "proposal", "veto", "model", "command", "station", "suspension", "retry")
QUEUE_SIZE = 256
#: how long a client's sender waits after a message for the rest of its burst (a trial's end is a
#: state change, a result, a proposal, ...): fewer frames for many clients, well inside the 1 s a
#: result may take to reach the page
COALESCE_SECONDS = 0.1


@dataclass(eq=False)
class Client:
    """One websocket's queue of messages, each already encoded as JSON text (encoded once per
    message, not once per client)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    overflowed: bool = False
    dropped: int = 0

    def put(self, text: str) -> None:
        """Called on the client's loop: enqueue, dropping the oldest when full."""
        if self.queue.full():
            try:
                self.queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            self.overflowed = True
            self.dropped += 1
        self.queue.put_nowait(text)

    async def next(self) -> str:
        """The next frame to send: one message, or every message queued meanwhile as one
        ``{"topic": "batch", "items": [...]}`` frame (a burst costs one frame, not one per message)."""
        texts = [await self.queue.get()]
        await asyncio.sleep(COALESCE_SECONDS)  # what a trial's end brings comes in a burst: one frame
        while not self.queue.empty() and len(texts) < QUEUE_SIZE:
            texts.append(self.queue.get_nowait())
        if self.overflowed:
            self.overflowed = False
            texts.insert(0, json.dumps({"topic": "refresh", "body": {"reason": "you fell behind; refetch everything"}}))
        return texts[0] if len(texts) == 1 else '{"topic": "batch", "items": [' + ", ".join(texts) + "]}"


def _fan_out(clients: list[Client], text: str) -> None:
    for c in clients:
        c.put(text)


def ledger_signature(ledger: Ledger, campaign_id: int) -> dict[str, Any]:
    """What changed since last time, in a few cheap queries."""
    with Session(ledger.engine) as s:
        ev = s.scalar(select(func.max(TrialEventRow.id)).join(TrialRow, TrialRow.id == TrialEventRow.trial_id)
                      .where(TrialRow.campaign_id == campaign_id))
        cmd = s.execute(select(func.max(CommandRow.id), func.count()).where(
            CommandRow.campaign_id == campaign_id)).first()
        pending = s.scalar(select(func.count()).select_from(CommandRow).where(
            CommandRow.campaign_id == campaign_id, CommandRow.status == "pending"))
        models = s.scalar(select(func.count()).select_from(ModelVersionRow).where(
            ModelVersionRow.campaign_id == campaign_id))
        awaiting = s.scalar(select(func.count()).select_from(TrialRow).where(
            TrialRow.campaign_id == campaign_id, TrialRow.awaiting.is_not(None)))
        row = s.get(CampaignRow, campaign_id)
        camp = (row.status, bool(row.paused), row.stream_address, campaign_is_live(row),
                str(row.budget_override)) if row else None
    return {"trials": (ev, awaiting), "commands": (cmd[0] if cmd else None, pending),
            "models": models, "campaign": camp}


class Feed:
    """One campaign's relay thread and its clients."""

    def __init__(self, key: str, ledger: Ledger, campaign_id: int, *, poll_every: float = 0.5,
                 address_every: float = 2.0, use_stream: bool = True) -> None:
        self.key, self.ledger, self.campaign_id = key, ledger, campaign_id
        self.poll_every, self.address_every, self.use_stream = poll_every, address_every, use_stream
        self.clients: set[Client] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stream_address: str | None = None
        self.stream_messages = 0

    # ---- clients ------------------------------------------------------------------
    def add(self, client: Client) -> None:
        with self._lock:
            self.clients.add(client)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name=f"labpilot-console-live-{self.key}",
                                                daemon=True)
                self._thread.start()

    def remove(self, client: Client) -> None:
        with self._lock:
            self.clients.discard(client)
            if not self.clients:
                self._stop.set()

    def publish(self, msg: dict[str, Any]) -> None:
        """From any thread: hand ``msg`` to every client's loop (never blocks). Encoded once, and
        one wake-up per event loop (all of a console's clients share one), not one per client:
        in ``labpilot run --console`` this runs on the campaign's own thread."""
        with self._lock:
            clients = list(self.clients)
        if not clients:
            return
        text = json.dumps(msg, default=str)
        by_loop: dict[asyncio.AbstractEventLoop, list[Client]] = {}
        for c in clients:
            by_loop.setdefault(c.loop, []).append(c)
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_fan_out, group, text)
            except RuntimeError:  # that loop has closed
                for c in group:
                    self.remove(c)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    # ---- the thread -------------------------------------------------------------------
    def _run(self) -> None:
        sub = None
        last_sig: dict[str, Any] | None = None
        next_poll = next_address = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if self.use_stream and now >= next_address:
                    next_address = now + self.address_every
                    sub = self._follow_address(sub)
                if now >= next_poll:
                    next_poll = now + self.poll_every
                    try:
                        sig = ledger_signature(self.ledger, self.campaign_id)
                    except Exception:  # noqa: BLE001 - a busy or gone database: try again next time
                        log.exception("console: polling campaign %s failed", self.key)
                        sig = last_sig
                    if last_sig is not None and sig is not None and sig != last_sig:
                        changed = [k for k in sig if sig[k] != last_sig.get(k)]
                        self.publish({"topic": "ledger", "body": {"changed": changed}})
                    last_sig = sig
                if sub is not None:
                    try:
                        msg = sub.recv(timeout=0.1)
                    except Exception:  # noqa: BLE001 - a broken socket: resubscribe on the next check
                        log.exception("console: the stream of %s failed", self.key)
                        sub = self._close(sub)
                        continue
                    if msg is not None and self._ours(msg.body):
                        self.stream_messages += 1
                        self.publish({"topic": msg.topic, "body": msg.body, "via": "stream"})
                else:
                    self._stop.wait(0.1)
        finally:
            self._close(sub)

    def _ours(self, body: Any) -> bool:
        return isinstance(body, dict) and body.get("campaign_id") in (None, self.campaign_id)

    def _follow_address(self, sub: Any) -> Any:
        try:
            address = self.ledger.campaign(self.campaign_id).stream_address
        except Exception:  # noqa: BLE001
            return sub
        if address == self.stream_address and (sub is not None or address is None):
            return sub
        sub = self._close(sub)
        self.stream_address = address
        if address:
            try:
                from orchestrator.stream import Subscriber

                sub = Subscriber(address, topics=STREAM_TOPICS)
            except Exception:  # noqa: BLE001 - unreachable or malformed: the ledger poll goes on
                log.warning("console: cannot follow the stream of %s at %s", self.key, address)
                sub = None
        return sub

    @staticmethod
    def _close(sub: Any) -> None:
        if sub is not None:
            try:
                sub.close()
            except Exception:  # noqa: BLE001
                pass
        return None


class LiveHub:
    """Every campaign's feed, created on first use."""

    def __init__(self, *, poll_every: float = 0.5, use_stream: bool = True) -> None:
        self.feeds: dict[str, Feed] = {}
        self.poll_every, self.use_stream = poll_every, use_stream
        self._lock = threading.Lock()

    def feed(self, key: str, ledger: Ledger, campaign_id: int) -> Feed:
        with self._lock:
            f = self.feeds.get(key)
            if f is None:
                f = self.feeds[key] = Feed(key, ledger, campaign_id, poll_every=self.poll_every,
                                           use_stream=self.use_stream)
            return f

    def listener(self, key_of: Callable[[int], str]) -> Callable[[str, dict[str, Any]], None]:
        """A ``Ledger.listeners`` callable: every change the ledger makes in this process goes
        straight to the feed of its campaign (``key_of(campaign_id)`` names it)."""

        def on_change(topic: str, body: dict[str, Any]) -> None:
            cid = body.get("campaign_id")
            if cid is None:
                return
            f = self.feeds.get(key_of(int(cid)))
            if f is not None and f.clients:
                f.publish({"topic": topic, "body": body, "via": "ledger"})

        return on_change

    def stop(self) -> None:
        for f in list(self.feeds.values()):
            f.stop()
