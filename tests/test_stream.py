"""The ZeroMQ stream: every message arrives in order, losses are detected, late followers catch up."""

from __future__ import annotations

import struct
import threading
import time

import msgpack
import pytest
from bluesky import RunEngine
from bluesky.plans import count
from ophyd.sim import det

from orchestrator.ledger import Ledger
from orchestrator.stream import (
    Gap,
    Listener,
    Proxy,
    Publisher,
    StreamError,
    Subscriber,
    document_callback,
    follow_results,
)
from planners.base import Proposal


@pytest.fixture
def proxy():
    with Proxy() as p:
        yield p


def _collect(sub: Subscriber, n: int, timeout: float = 20.0) -> list:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        msg = sub.recv(timeout=0.1)
        if msg is not None:
            out.append(msg)
    return out


def test_proxy_binds_loopback_on_free_ports(proxy):
    assert proxy.publish_address.startswith("tcp://127.0.0.1:")
    assert proxy.subscribe_address.startswith("tcp://127.0.0.1:")
    assert proxy.publish_address != proxy.subscribe_address


def test_every_published_document_arrives_in_order_at_every_subscriber(proxy):
    subs = [Subscriber(proxy.subscribe_address, from_start=True) for _ in range(3)]
    pub = Publisher(proxy.publish_address, name="station-1")
    for s in subs:
        s.wait_linked(pub)
    n = 3000
    for i in range(n):
        pub.publish("doc", {"name": "event", "doc": {"seq_num": i, "data": {"y": i * 0.5}}})
    for s in subs:
        got = _collect(s, n)
        assert [m.body["doc"]["seq_num"] for m in got] == list(range(n))
        assert [m.seq for m in got] == list(range(1, n + 1))
        assert {m.publisher for m in got} == {"station-1"}
        assert s.gaps == []
        s.close()
    pub.close()


def test_sequence_numbers_count_per_topic_so_a_topic_subscriber_sees_no_false_gap(proxy):
    only_trials = Subscriber(proxy.subscribe_address, topics=("trial",), from_start=True)
    pub = Publisher(proxy.publish_address)
    only_trials.wait_linked(pub)
    for i in range(50):
        pub.publish("doc", {"i": i})
        if i % 5 == 0:
            pub.publish("trial", {"i": i})
    got = _collect(only_trials, 10)
    assert [m.body["i"] for m in got] == list(range(0, 50, 5))
    assert only_trials.gaps == []


def test_a_skipped_message_is_reported_as_a_gap_and_a_repeat_is_dropped(proxy):
    gaps: list[Gap] = []
    sub = Subscriber(proxy.subscribe_address, on_gap=gaps.append)
    pub = Publisher(proxy.publish_address, name="p")
    sub.wait_linked(pub)
    pub.publish("trial", {"i": 1})
    pub._seq["trial"] += 2  # two messages lost on the way
    pub.publish("trial", {"i": 4})
    pub._seq["trial"] -= 1  # a repeat of #4
    pub.publish("trial", {"i": "again"})
    pub.publish("trial", {"i": 5})
    got = _collect(sub, 3, timeout=5)
    assert [m.body["i"] for m in got] == [1, 4, 5]
    assert gaps == [Gap("p", "trial", 2, 4)] and gaps[0].missing == 2
    assert sub.stats.repeated == 1


def test_messages_dropped_by_a_full_queue_are_all_accounted_for_as_gaps():
    """A subscriber that does not keep up loses messages (ZeroMQ drops at the high-water
    mark), and every lost one is counted: received + missing = published."""
    with Proxy(hwm=20) as small:
        sub = Subscriber(small.subscribe_address, hwm=20, from_start=True)
        pub = Publisher(small.publish_address, hwm=20)
        sub.wait_linked(pub)
        n = 20_000
        for i in range(n):
            pub.publish("doc", {"i": i})
        received = 0
        while sub.recv(timeout=0.5) is not None:  # read until the queues are empty
            received += 1
        pub.publish("doc", {"i": "last"})  # a loss at the end shows when the next message comes
        msg = sub.recv(timeout=5)
        assert msg is not None and msg.body["i"] == "last"
        received += 1
        missing = sum(g.missing for g in sub.gaps)
        assert missing > 0, "the burst should have overflowed a 20-message queue"
        assert received + missing == n + 1


def test_bluesky_documents_travel_as_a_plain_callback_would_see_them(proxy):
    seen_local: list[tuple[str, dict]] = []
    seen_remote: list[tuple[str, dict]] = []
    pub = Publisher(proxy.publish_address)
    sub = Subscriber(proxy.subscribe_address, topics=("doc",))
    sub.wait_linked(pub)
    listener = Listener(sub, document_callback(lambda name, doc: seen_remote.append((name, doc)))).start()
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(lambda name, doc: seen_local.append((name, doc)))
    RE.subscribe(pub.document_callback("station-1"))
    RE(count([det], num=3), trial_id=7)
    deadline = time.monotonic() + 10
    while len(seen_remote) < len(seen_local) and time.monotonic() < deadline:
        time.sleep(0.02)
    listener.stop()
    assert [n for n, _ in seen_remote] == ["start", "descriptor", "event", "event", "event", "stop"]
    assert [d["uid"] for _, d in seen_remote] == [d["uid"] for _, d in seen_local]
    assert seen_remote[0][1]["trial_id"] == 7
    assert [d["data"]["det"] for n, d in seen_remote if n == "event"] == \
        [d["data"]["det"] for n, d in seen_local if n == "event"]


def test_a_link_that_never_comes_up_says_so(proxy):
    sub = Subscriber(proxy.subscribe_address)
    stray = Publisher("tcp://127.0.0.1:1")  # nothing listens there
    with pytest.raises(StreamError, match="no message"):
        sub.wait_linked(stray, timeout=0.3)


def test_a_taken_port_is_a_clear_error(proxy):
    port = proxy.publish_address.rsplit(":", 1)[1]
    with pytest.raises(StreamError, match="free ports"):
        Proxy(publish_address=f"tcp://127.0.0.1:{port}").start()


# ---- the ledger's news and late followers -------------------------------------------
def _ledger(tmp_path) -> tuple[Ledger, int]:
    ledger = Ledger.for_directory(tmp_path)
    cid, _ = ledger.open_campaign("c", {}, 0)
    return ledger, cid


def _run_trial(ledger: Ledger, cid: int, x: float, ok: bool = True) -> int:
    tid = ledger.propose(cid, Proposal(parameters={"x": x}, planner="random", seed=0))
    ledger.transition(tid, "approved", "system")
    ledger.transition(tid, "running", "system")
    if ok:
        ledger.complete(tid, {"y": x * 2}, run_uid=f"uid-{tid}")
    else:
        ledger.transition(tid, "failed", "system", "broke")
    return tid


def test_the_ledger_tells_the_stream_every_change_after_recording_it(proxy, tmp_path):
    ledger, cid = _ledger(tmp_path)
    pub = Publisher(proxy.publish_address)
    sub = Subscriber(proxy.subscribe_address, topics=("trial", "proposal"))
    sub.wait_linked(pub)
    states_in_ledger: list[str] = []

    def relay(topic, body):
        # the record exists before the news leaves
        states_in_ledger.append(ledger.trial(body["trial_id"]).state)
        pub.publish(topic, body)

    ledger.listeners.append(relay)
    tid = _run_trial(ledger, cid, 1.5)
    got = _collect(sub, 5)
    assert [(m.topic, m.body["state"]) for m in got] == [
        ("proposal", "proposed"), ("trial", "proposed"), ("trial", "approved"), ("trial", "running"),
        ("trial", "completed")]
    assert got[-1].body["outcomes"] == {"y": 3.0} and got[-1].body["trial_id"] == tid
    assert states_in_ledger == [m.body["state"] for m in got]


def test_a_failing_listener_loses_no_record(tmp_path):
    ledger, cid = _ledger(tmp_path)
    ledger.listeners.append(lambda topic, body: 1 / 0)
    tid = _run_trial(ledger, cid, 2.0)
    assert ledger.trial(tid).state == "completed"
    assert ledger.trial(tid).observation.values == {"y": 4.0}


def test_a_late_follower_catches_up_from_the_ledger_then_follows_live_without_miss_or_repeat(proxy, tmp_path):
    ledger, cid = _ledger(tmp_path)
    pub = Publisher(proxy.publish_address)
    ledger.listeners.append(pub.publish)
    before = [_run_trial(ledger, cid, float(i), ok=i != 2) for i in range(5)]  # nobody listening yet

    sub = Subscriber(proxy.subscribe_address, topics=("trial",))
    sub.wait_linked(pub)
    stop = threading.Event()
    seen = []
    during = []

    def follow():
        for r in follow_results(ledger, cid, sub, stop=stop):
            seen.append(r)
            if len(seen) == 2:  # results keep coming while the follower is still catching up
                during.extend(_run_trial(ledger, cid, 10.0 + k) for k in range(3))

    th = threading.Thread(target=follow)
    th.start()
    deadline = time.monotonic() + 10
    while len(seen) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    after = [_run_trial(ledger, cid, 20.0 + k) for k in range(3)]
    while len(seen) < 11 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    th.join(5)
    ids = [r.trial_id for r in seen]
    assert sorted(ids) == sorted(before + during + after)  # none missed
    assert len(ids) == len(set(ids))  # none repeated
    assert {r.source for r in seen[:5]} == {"ledger"}
    assert [r.state for r in seen if r.trial_id == before[2]] == ["failed"]
    assert all(r.outcomes == {"y": r.parameters["x"] * 2} for r in seen if r.state == "completed")


def test_a_result_lost_on_the_stream_is_filled_in_from_the_ledger(proxy, tmp_path):
    ledger, cid = _ledger(tmp_path)
    pub = Publisher(proxy.publish_address)
    dropped = []

    def lossy(topic, body):  # the stream loses one "completed" message
        if topic == "trial" and body["state"] == "completed" and not dropped:
            dropped.append(body["trial_id"])
            pub._seq["trial"] = pub._seq.get("trial", 0) + 1
            return
        pub.publish(topic, body)

    ledger.listeners.append(lossy)
    sub = Subscriber(proxy.subscribe_address, topics=("trial",))
    sub.wait_linked(pub)
    stop = threading.Event()
    seen = []
    th = threading.Thread(target=lambda: seen.extend(follow_results(ledger, cid, sub, stop=stop)))
    th.start()
    ids = [_run_trial(ledger, cid, float(i)) for i in range(4)]
    deadline = time.monotonic() + 10
    while len(seen) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    th.join(5)
    assert dropped and sorted(r.trial_id for r in seen) == sorted(ids)
    assert [r.source for r in seen if r.trial_id == dropped[0]] == ["ledger"]
    assert sub.gaps


# ---- frames that are not labpilot's -------------------------------------------------
def _frame(topic: str, seq: int, name: str, body: bytes) -> bytes:
    """A frame as labpilot's Publisher builds it, with any sequence number and body."""
    n = name.encode()
    return topic.encode() + b"\0" + struct.pack(">QdB", seq, time.time(), len(n)) + n + body


def _linked(sub: Subscriber, *pubs: Publisher) -> None:
    for pub in pubs:  # each publisher's own link (a forger sends raw frames, so it must be up too)
        sub._synced.clear()
        sub.wait_linked(pub)


def test_bad_frames_are_counted_and_skipped_and_the_listener_goes_on(proxy):
    got: list = []
    sub = Subscriber(proxy.subscribe_address, topics=("doc", "trial"))
    pub, forger = Publisher(proxy.publish_address, name="station-1"), Publisher(proxy.publish_address)
    _linked(sub, forger, pub)
    skipped = []
    documents = document_callback(lambda name, doc: skipped.append(name))
    listener = Listener(sub, lambda m: documents(m) if m.topic == "doc" else got.append(m)).start()
    try:
        forger._sock.send_multipart([b"doc\0", b"a second frame"])
        for frame in (b"doc\0short", _frame("doc", 1, "forger", b"\xc1\xc1"),  # header; not msgpack
                      _frame("doc", 2, "forger", msgpack.packb([1, 2])),  # not a map
                      _frame("doc", 3, "forger", msgpack.packb({"name": 5, "doc": "x"})),  # wrong types
                      _frame("doc", 4, "forger", msgpack.packb({"doc": {}}))):  # no name
            forger._sock.send(frame)
        for i in range(5):
            pub.publish("trial", {"i": i})
        deadline = time.monotonic() + 10
        while len(got) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [m.body["i"] for m in got] == list(range(5))
        assert sub.stats.bad == 4  # frame count, header, msgpack, not a map
        assert documents.skipped == 2 and skipped == []  # well-formed messages, but not documents
    finally:
        listener.stop()


def test_an_oversized_frame_is_refused_and_the_real_messages_after_it_arrive(proxy):
    sub = Subscriber(proxy.subscribe_address, topics=("doc",))
    pub, forger = Publisher(proxy.publish_address, name="station-1"), Publisher(proxy.publish_address)
    _linked(sub, forger, pub)
    forger._sock.send(_frame("doc", 1, forger.name, msgpack.packb({"name": "event", "doc": {"x": b"\0" * 50 * 2**20}})))
    for i in range(20):
        pub.publish("doc", {"name": "event", "doc": {"i": i}})
    got = _collect(sub, 20, timeout=10)
    assert [m.body["doc"]["i"] for m in got] == list(range(20))
    assert sub.recv(timeout=0.3) is None  # the 50 MB frame never reached the subscriber


def test_a_subscriber_counts_and_skips_a_frame_over_its_own_limit(proxy):
    sub = Subscriber(proxy.subscribe_address, max_message=1000)
    assert sub._accept(_frame("doc", 1, "p", msgpack.packb({"name": "event", "doc": {"x": "y" * 2000}}))) is None
    assert sub.stats.bad == 1 and sub.stats.received == 0
    sub.close()


def test_a_forged_huge_sequence_number_does_not_hide_later_real_messages(proxy):
    sub = Subscriber(proxy.subscribe_address, topics=("trial",))
    pub, forger = Publisher(proxy.publish_address, name="station-1"), Publisher(proxy.publish_address)
    _linked(sub, forger, pub)
    for i in range(5):
        pub.publish("trial", {"i": i})
    assert len(_collect(sub, 5, timeout=5)) == 5
    forger._sock.send(_frame("trial", 2**64 - 1, "station-1", msgpack.packb({"i": "forged"})))
    time.sleep(0.2)
    for i in range(5, 25):
        pub.publish("trial", {"i": i})
    got = _collect(sub, 20, timeout=10)
    assert [m.body["i"] for m in got] == list(range(5, 25))
    assert sub.stats.bad == 1 and sub.gaps == []


def test_a_loss_beyond_the_jump_limit_is_believed_once_the_numbering_goes_on_from_it(proxy):
    sub = Subscriber(proxy.subscribe_address, topics=("trial",))
    pub = Publisher(proxy.publish_address, name="p")
    sub.wait_linked(pub)
    pub.publish("trial", {"i": 1})
    pub._seq["trial"] += 50_000  # a night's worth lost on the way
    for i in range(2, 5):
        pub.publish("trial", {"i": i})
    got = _collect(sub, 3, timeout=5)
    assert [m.body["i"] for m in got] == [1, 3, 4]  # the first after the jump is held as suspect
    assert sum(g.missing for g in sub.gaps) == 50_001 and sub.stats.bad == 1


def test_a_publisher_restarted_under_its_name_is_followed_from_its_new_start(proxy):
    sub = Subscriber(proxy.subscribe_address, topics=("trial",))
    first = Publisher(proxy.publish_address, name="campaign-1")
    sub.wait_linked(first)
    for i in range(30):
        first.publish("trial", {"i": i})
    assert len(_collect(sub, 30, timeout=5)) == 30
    first.close()
    again = Publisher(proxy.publish_address, name="campaign-1")  # numbering starts at 1 again
    _linked(sub, again)
    for i in range(3):
        again.publish("trial", {"i": 100 + i})
    got = _collect(sub, 3, timeout=5)
    assert [m.body["i"] for m in got] == [100, 101, 102]
