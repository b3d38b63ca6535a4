"""The campaign's bus: event-model documents and campaign events over ZeroMQ, in order, gaps detected.

Topology (DESIGN.md): publishers (one per RunEngine station, one for the
campaign's own events) connect to a *proxy*; subscribers (the surrogate
trainer, the console, anything else) connect to its other side. In one
``labpilot run`` process the proxy runs on a thread bound to loopback on free
ports; across hosts it runs alone (``labpilot proxy``) and everyone is given
its two addresses (``LABPILOT_STREAM_PUBLISH`` / ``LABPILOT_STREAM_SUBSCRIBE``).

A message is one ZeroMQ frame (one frame, not several: at tens of thousands of
documents a second every system call counts)::

    topic      b"doc" (event-model documents), b"trial", b"proposal", b"veto",
               b"model", b"calibration", b"command", b"station" (a station taken out of
               rotation or brought back), b"suspension" (an interlock held a run), b"retry" (a
               failed read attempt) (campaign events), b"_sync" (link checks)
    b"\0"      end of the topic (subscriptions match b"doc\0", never a longer topic)
    stamp      big-endian uint64 seq, float64 unix time, uint8 length of the name
    publisher  its name, UTF-8 (host:pid:random unless named)
    body       msgpack dict; for b"doc": {"name", "doc", "instrument"}

``seq`` counts 1, 2, 3, ... per publisher *and topic*, so a subscriber that
takes only some topics can still tell a lost message from one it did not ask
for. A subscriber records every gap (``Subscriber.gaps``, ``on_gap``) and
drops repeats. ZeroMQ's PUB socket drops silently when a queue is full, so
both ends get a high-water mark far above any burst a lab makes; a dropped
message still shows as a gap, never as silence.

Why not bluesky's ``Publisher``/``RemoteDispatcher``/``Proxy`` as they are:
the publisher has no sequence numbers (a subscriber cannot know it missed
something), pickles (unsafe to accept from another host), deep-copies every
document, and the proxy keeps ZeroMQ's default high-water mark (1000
messages, so a burst is dropped) and can only be stopped by destroying its
context. What bluesky's pieces *do* give is kept: the consumer side is a plain
``callback(name, doc)`` (:func:`document_callback`), so any bluesky callback
works behind this bus as it does in-process.

The ledger is written by the flow, never by the stream: this bus only tells
others what the ledger already holds, and losing it loses no data. A
subscriber that joins late catches up from the ledger first
(:func:`follow_results`) and then follows the live stream, missing and
repeating no result.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import zmq

log = logging.getLogger("labpilot.stream")

TOPICS = ("doc", "trial", "proposal", "veto", "model", "calibration", "command", "station", "suspension",
          "retry")
SYNC = "_sync"
DEFAULT_HWM = 1_000_000  # messages queued per socket before ZeroMQ drops (a burst of a night's documents)
#: the largest message a subscriber (and the proxy) takes, in bytes; ``LABPILOT_STREAM_MAX_MESSAGE``
#: overrides it. A run's document is kilobytes; a bigger frame is a mistake or an attack, and one
#: frame must not make a subscriber allocate and unpack without bound.
DEFAULT_MAX_MESSAGE = 16 * 2**20
#: a sequence number further than this ahead of the last one seen is implausible (no lab loses
#: ten thousand messages in a row unnoticed); it is counted as bad and does not move the expected
#: number, so one forged ``2**64 - 1`` cannot make every later real message look like a repeat
MAX_SEQ_JUMP = 10_000


def max_message_size() -> int:
    """The configured message size limit: ``LABPILOT_STREAM_MAX_MESSAGE`` bytes, else 16 MiB."""
    raw = os.environ.get("LABPILOT_STREAM_MAX_MESSAGE", "")
    if not raw:
        return DEFAULT_MAX_MESSAGE
    try:
        value = int(raw)
    except ValueError:
        raise StreamError(f"LABPILOT_STREAM_MAX_MESSAGE={raw!r}: give a size in bytes, "
                          f"e.g. {DEFAULT_MAX_MESSAGE}") from None
    if value <= 0:
        raise StreamError(f"LABPILOT_STREAM_MAX_MESSAGE={raw!r}: give a positive size in bytes")
    return value


def _encode_default(obj: Any) -> Any:
    """msgpack fallback: numpy and torch scalars/arrays, anything else as its string."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


_STAMP = struct.Struct(">QdB")


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Message(NamedTuple):
    """One message off the bus."""

    topic: str
    publisher: str
    seq: int
    time: float
    body: dict[str, Any]


@dataclass(frozen=True)
class Gap:
    """Messages ``expected`` .. ``received - 1`` of ``publisher`` on ``topic`` never arrived."""

    publisher: str
    topic: str
    expected: int
    received: int

    @property
    def missing(self) -> int:
        return self.received - self.expected


class StreamError(RuntimeError):
    """The bus could not be set up (an address in use or malformed)."""


# ---- the proxy ------------------------------------------------------------------
class Proxy:
    """XSUB/XPUB forwarder on a thread: publishers connect to ``publish_address``,
    subscribers to ``subscribe_address``. Port 0 (the default) picks free ports.

    ``Proxy().start()`` for the embedded default (loopback); ``labpilot proxy`` runs
    one on its own for a campaign that spans hosts.
    """

    def __init__(self, publish_address: str = "tcp://127.0.0.1:0",
                 subscribe_address: str = "tcp://127.0.0.1:0", hwm: int = DEFAULT_HWM,
                 max_message: int | None = None) -> None:
        self._requested = (publish_address, subscribe_address)
        self.hwm = hwm
        self.max_message = max_message if max_message is not None else max_message_size()
        self.publish_address = ""
        self.subscribe_address = ""
        self._ctx = zmq.Context()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._control_address = f"inproc://labpilot-proxy-{uuid.uuid4().hex}"

    def start(self) -> Proxy:
        self._thread = threading.Thread(target=self._run, name="labpilot-stream-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise StreamError(f"the stream proxy could not start: {self._error}; "
                              "pick free ports in LABPILOT_STREAM_PUBLISH / LABPILOT_STREAM_SUBSCRIBE") \
                from self._error
        return self

    def _run(self) -> None:
        front = self._ctx.socket(zmq.XSUB)
        back = self._ctx.socket(zmq.XPUB)
        control = self._ctx.socket(zmq.PAIR)
        try:
            for s in (front, back):
                s.setsockopt(zmq.SNDHWM, self.hwm)
                s.setsockopt(zmq.RCVHWM, self.hwm)
                s.setsockopt(zmq.LINGER, 0)
            # a publisher that sends an oversized frame is disconnected here, before any
            # subscriber has to take it; the other publishers' connections are not touched
            front.setsockopt(zmq.MAXMSGSIZE, self.max_message)
            self.publish_address = _bind(front, self._requested[0])
            self.subscribe_address = _bind(back, self._requested[1])
            control.bind(self._control_address)
        except zmq.ZMQError as exc:
            self._error = exc
            for s in (front, back, control):
                s.close(0)
            self._ready.set()
            return
        self._ready.set()
        try:
            zmq.proxy_steerable(front, back, None, control)
        except zmq.ContextTerminated:
            pass
        finally:
            for s in (front, back, control):
                s.close(0)

    def stop(self) -> None:
        if self._thread is None:
            return
        with self._ctx.socket(zmq.PAIR) as ctl:
            ctl.connect(self._control_address)
            ctl.send(b"TERMINATE")
            self._thread.join(5)
        self._thread = None
        self._ctx.term()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_loopback(address: str) -> bool:
    """Whether a ZeroMQ address is reachable from this host only (ipc, inproc, 127.x, ::1, localhost)."""
    import ipaddress

    if not address.startswith(("tcp://", "ws://", "wss://")):
        return address.startswith(("ipc://", "inproc://"))
    host = address.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface or host name (eth0, *): taken as reachable from outside
        return False


def _bind(sock: zmq.Socket, address: str) -> str:
    """Bind to ``address`` (port 0 or ``*``: a free port); return the address others connect to."""
    if address.startswith("tcp://") and address.rsplit(":", 1)[-1] in ("0", "*"):
        address = address.rsplit(":", 1)[0] + ":*"
    sock.bind(address)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return endpoint.replace("tcp://0.0.0.0:", f"tcp://{socket.gethostname()}:")


# ---- publishing -----------------------------------------------------------------
class Publisher:
    """Publishes on the bus with a sequence number per topic. Thread-safe (one lock per
    publisher), so every station's RunEngine thread and the flow can share one."""

    def __init__(self, address: str, name: str | None = None, hwm: int = DEFAULT_HWM,
                 context: zmq.Context | None = None) -> None:
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._name_b = self.name.encode()
        if len(self._name_b) > 255:
            raise ValueError(f"publisher name {self.name!r} is longer than 255 bytes; give a shorter one")
        self._topics: dict[str, bytes] = {}
        self._packer = msgpack.Packer(default=_encode_default, use_bin_type=True)
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(address)
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()
        self.sent = 0
        self.closed = False

    def publish(self, topic: str, body: dict[str, Any]) -> int:
        """Send ``body`` on ``topic``; return its sequence number. Never raises for the bus's
        sake: a failed send is logged (the ledger already holds the data) and counted."""
        with self._lock:
            if self.closed:
                return 0
            seq = self._seq.get(topic, 0) + 1
            self._seq[topic] = seq
            head = self._topics.get(topic)
            if head is None:
                head = self._topics[topic] = topic.encode() + b"\0"
            try:
                self._sock.send(b"".join((head, _STAMP.pack(seq, time.time(), len(self._name_b)), self._name_b,
                                          self._packer.pack(body))))
                self.sent += 1
            except zmq.ZMQError as exc:  # the ledger has it; the subscriber will see the gap
                log.warning("stream: could not publish %s #%d: %s", topic, seq, exc)
        return seq

    def document_callback(self, instrument: str = "") -> Callable[[str, dict[str, Any]], None]:
        """A bluesky callback ``(name, doc)`` that publishes each document on ``doc``."""
        def callback(name: str, doc: dict[str, Any]) -> None:
            self.publish("doc", {"name": name, "doc": doc, "instrument": instrument})
        return callback

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self._sock.close()


# ---- subscribing ----------------------------------------------------------------
@dataclass
class _Stats:
    received: int = 0
    repeated: int = 0
    #: frames dropped as not labpilot's (size, frame count, header, msgpack, types, sequence number)
    bad: int = 0
    gaps: list[Gap] = field(default_factory=list)


_MAX_NAMES = 10_000  # publisher names cached; beyond that (forged names) they are decoded each time


class Subscriber:
    """Receives messages on ``topics`` (all campaign topics by default), in order per
    publisher and topic; detects gaps and drops repeats.

    The first message seen from a publisher on a topic is taken as the start (a
    subscriber that joins late is not "missing" what came before: it catches up
    from the ledger), unless ``from_start`` says that publisher's numbering must
    start at 1. A publisher that restarts under the same name begins again at 1,
    and is followed from there.

    A frame that is not a labpilot message (more than one frame, over ``max_message``
    bytes, a header or body that does not parse, a body of the wrong types, a sequence
    number of 0 or more than :data:`MAX_SEQ_JUMP` ahead) is counted in ``stats.bad``,
    logged on ``labpilot.stream`` and skipped: one bad frame never stops a subscriber.
    This is plausibility, not authentication: anyone who can reach the proxy can still
    publish well-formed messages under any name. Authenticated publishers (ZeroMQ CURVE)
    come with the multi-host deployment.
    """

    def __init__(self, address: str, topics: tuple[str, ...] = TOPICS, hwm: int = DEFAULT_HWM,
                 from_start: bool = False, on_gap: Callable[[Gap], None] | None = None,
                 context: zmq.Context | None = None, max_message: int | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        self.max_message = max_message if max_message is not None else max_message_size()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        # ZeroMQ refuses (and disconnects from) a peer that sends more; the length is checked
        # again in _accept because transports such as inproc do not enforce this option
        self._sock.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        for t in (*topics, SYNC):
            self._sock.setsockopt(zmq.SUBSCRIBE, t.encode() + b"\0")
        self._names: dict[bytes, str] = {}
        self._sock.connect(address)
        self.topics = topics
        self.from_start = from_start
        self.on_gap = on_gap
        self._last: dict[tuple[str, str], int] = {}
        self._suspect: dict[tuple[str, str], int] = {}  # an implausible jump, dropped, not yet believed
        self.stats = _Stats()
        self._synced = threading.Event()
        self._buffer: deque[Message] = deque()  # real messages that arrived while checking the link

    @property
    def gaps(self) -> list[Gap]:
        return self.stats.gaps

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message (``None`` after ``timeout`` seconds). Link checks, repeats and bad
        frames are consumed here and not returned."""
        if self._buffer:
            return self._buffer.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:  # what is already queued needs no poll
                msg = self._accept(self._sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._sock.poll(max(1, int(left * 1000))):
                        return None
                msg = self._accept(self._sock.recv())
            if msg is not None:
                return msg

    def drain(self, limit: int = 10_000) -> list[Message]:
        """Every message waiting now (up to ``limit``), without blocking."""
        out: list[Message] = []
        while self._buffer and len(out) < limit:
            out.append(self._buffer.popleft())
        while len(out) < limit:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = self._accept(frame)
            if msg is not None:
                out.append(msg)
        return out

    def _bad(self, why: str, size: int) -> None:
        self.stats.bad += 1
        n = self.stats.bad
        if n <= 20 or n % 1000 == 0:  # a flood of garbage must not flood campaign.log
            log.warning("stream: dropped a message that is not in labpilot's format (%s, %d bytes; "
                        "%d dropped so far)", why, size, n)

    def _accept(self, frame: bytes) -> Message | None:
        """``frame`` just received (the socket still tells whether more frames follow it) as a
        message, or ``None`` (a link check, a repeat, a bad frame)."""
        if self._sock.get(zmq.RCVMORE):  # labpilot sends one frame; take and drop the rest
            parts = 1
            while True:
                parts += 1
                self._sock.recv()
                if not self._sock.get(zmq.RCVMORE):
                    break
            self._bad(f"{parts} frames, labpilot sends one", len(frame))
            return None
        if len(frame) > self.max_message:
            self._bad(f"over the {self.max_message}-byte limit (LABPILOT_STREAM_MAX_MESSAGE)", len(frame))
            return None
        try:
            cut = frame.index(b"\0")
            seq, t, size = _STAMP.unpack_from(frame, cut + 1)
            start = cut + 1 + _STAMP.size
            raw = frame[: cut], frame[start: start + size]
            if len(raw[1]) != size:
                raise ValueError("name cut short")
            topic, publisher = (self._names.get(r) or self._name(r) for r in raw)
            body_at = start + size
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            self._bad(f"header: {exc}", len(frame))
            return None
        if topic == SYNC:
            self._synced.set()
            return None
        key = (publisher, topic)
        last = self._last.get(key)
        if last is None:
            last = 0 if self.from_start else seq - 1
        elif seq == 1 and last >= 1:  # the publisher restarted under the same name
            log.info("stream: %s restarted its numbering on %r (after #%d)", publisher, topic, last)
            last = 0
        if seq <= 0 or seq > last + MAX_SEQ_JUMP:
            # held as suspect: when the next message continues from it (and none continued the
            # old numbering in between) the jump was a real loss, and is reported as a gap
            suspect = self._suspect.get(key)
            if seq <= 0 or suspect is None or not suspect < seq <= suspect + MAX_SEQ_JUMP:
                self._suspect[key] = seq
                self._bad(f"sequence number {seq} of {publisher} on {topic!r} after #{last}", len(frame))
                return None
        if seq <= last:
            self.stats.repeated += 1
            return None
        # the body is checked before the numbering moves: a bad frame under a real publisher's
        # name must not make that publisher's next real message look like a repeat
        try:
            body = unpack(frame[body_at:])
        except Exception as exc:  # noqa: BLE001 - msgpack raises several kinds; any is a bad frame
            self._bad(f"body is not msgpack: {type(exc).__name__}", len(frame))
            return None
        if not isinstance(body, dict):
            self._bad(f"body is a {type(body).__name__}, not a map", len(frame))
            return None
        if seq > last + 1:
            gap = Gap(publisher, topic, last + 1, seq)
            self.stats.gaps.append(gap)
            log.warning("stream: %d message(s) of %s on %r never arrived (#%d..#%d)",
                        gap.missing, publisher, topic, gap.expected, seq - 1)
            if self.on_gap is not None:
                self.on_gap(gap)
        self._last[key] = seq
        self._suspect.pop(key, None)
        self.stats.received += 1
        return Message(topic, publisher, seq, t, body)

    def _name(self, raw: bytes) -> str:
        name = raw.decode()
        if len(self._names) < _MAX_NAMES:
            self._names[raw] = name
        return name

    def wait_linked(self, publisher: Publisher, timeout: float = 10.0) -> None:
        """Block until messages from ``publisher`` reach this subscriber (ZeroMQ drops what a
        publisher sends before the subscription has travelled to it: the "slow joiner")."""
        deadline = time.monotonic() + timeout
        while not self._synced.is_set():
            if time.monotonic() > deadline:
                raise StreamError(f"no message from {publisher.name} reached the subscriber in "
                                  f"{timeout:g} s; is the proxy running at the configured addresses?")
            publisher.publish(SYNC, {})
            if self._sock.poll(20):
                msg = self._accept(self._sock.recv())
                if msg is not None:  # kept for the caller, in order
                    self._buffer.append(msg)

    def close(self) -> None:
        self._sock.close(0)

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.recv()
            if msg is not None:
                yield msg


def document_callback(callback: Callable[[str, dict[str, Any]], Any]) -> Callable[[Message], None]:
    """Adapt a bluesky callback ``(name, doc)`` to messages: documents go to it, the rest not.
    A ``doc`` message without a string ``name`` and a map ``doc`` is logged, counted in the
    adapter's ``skipped`` and not passed on."""
    def on_message(msg: Message) -> None:
        if msg.topic == "doc":
            name, doc = msg.body.get("name"), msg.body.get("doc")
            if not isinstance(name, str) or not isinstance(doc, dict):
                on_message.skipped += 1  # type: ignore[attr-defined]
                if on_message.skipped <= 20 or on_message.skipped % 1000 == 0:  # type: ignore[attr-defined]
                    log.warning("stream: skipped a document message from %s (#%d) without a string 'name' "
                                "and a map 'doc'", msg.publisher, msg.seq)
                return
            callback(name, doc)
    on_message.skipped = 0  # type: ignore[attr-defined]
    return on_message


class Listener:
    """Runs a subscriber on a thread, handing each message to ``on_message``; ``stop()`` ends it.
    An exception in ``on_message`` is logged and the listener goes on (one bad message must not
    stop a night's stream)."""

    def __init__(self, subscriber: Subscriber, on_message: Callable[[Message], Any],
                 name: str = "labpilot-stream-listener") -> None:
        self.subscriber = subscriber
        self.on_message = on_message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Listener:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.subscriber.recv(timeout=0.1)
            except zmq.ContextTerminated:
                return
            except Exception:  # noqa: BLE001 - the subscriber skips bad frames; this is the last guard
                log.exception("stream: receiving failed; the listener goes on")
                time.sleep(0.1)  # a broken socket must not spin a core
                continue
            if msg is None:
                continue
            try:
                self.on_message(msg)
            except Exception:  # noqa: BLE001 - logged; the stream goes on
                log.exception("stream: a subscriber's callback failed on %s #%d", msg.topic, msg.seq)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.subscriber.close()


# ---- catching up ------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """A finished trial as a follower sees it; ``source`` says where it came from."""

    trial_id: int
    number: int
    state: str  # "completed" or "failed"
    parameters: dict[str, Any]
    outcomes: dict[str, float]
    source: str  # "ledger" or "stream"


def follow_results(ledger: Any, campaign_id: int, subscriber: Subscriber,
                   stop: threading.Event | None = None, poll: float = 0.1) -> Iterator[Result]:
    """Every finished trial of a campaign, once each, in the order they are learnt of: first
    those already in the ledger, then the live ones from the stream.

    ``subscriber`` must already be connected and take the ``trial`` topic: what is published
    while the ledger is read waits in its queue, and a result that is both in the ledger read
    and in that queue is given once (by trial id). A gap on the ``trial`` topic (a lost
    message) is filled from the ledger, which holds every result the stream could carry.
    Runs until ``stop`` is set.
    """
    seen: set[int] = set()

    def from_ledger() -> Iterator[Result]:
        for t in ledger.trials(campaign_id, ("completed", "failed")):
            if t.id not in seen:
                seen.add(t.id)
                values = dict(t.observation.values) if t.observation is not None else {}
                yield Result(t.id, t.number, t.state, dict(t.parameters), values, "ledger")

    yield from from_ledger()
    gaps = len(subscriber.gaps)
    while stop is None or not stop.is_set():
        msg = subscriber.recv(timeout=poll)
        if len(subscriber.gaps) > gaps:  # something was lost on the way: the ledger has it
            gaps = len(subscriber.gaps)
            yield from from_ledger()
        if msg is None or msg.topic != "trial":
            continue
        body = msg.body
        if body.get("campaign_id") != campaign_id or body.get("state") not in ("completed", "failed"):
            continue
        if body["trial_id"] in seen:
            continue
        seen.add(body["trial_id"])
        yield Result(body["trial_id"], body["number"], body["state"], dict(body["parameters"]),
                     dict(body.get("outcomes") or {}), "stream")
