"""Wires one campaign process to the stream and to its surrogate models.

- :class:`CampaignStream`: the bus of a ``labpilot run`` (its own loopback
  proxy unless addresses are configured), one publisher for every RunEngine's
  documents and for the ledger's news (trial changes, proposals, vetoes, model
  versions), published after the ledger has them.
- :class:`LiveModels`: what a planner asks for the newest model version. With
  ``trainer: inprocess`` it runs a :class:`~planners.surrogates.SurrogateTrainer`
  fed from the stream (the same path a trainer on another host takes); with
  ``external`` it follows the ``model`` topic and loads each version a
  ``labpilot trainer DIR`` process announces, from the campaign directory.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.ledger import Ledger
from orchestrator.stream import Listener, Message, Proxy, Publisher, Subscriber, document_callback

log = logging.getLogger("labpilot.learning")


class CampaignStream:
    """The bus of one campaign process; ``start()`` then ``stop()``."""

    def __init__(self, ledger: Ledger, campaign_id: int, publish: str | None = None,
                 subscribe: str | None = None) -> None:
        if (publish is None) != (subscribe is None):
            raise ValueError("give both stream addresses (LABPILOT_STREAM_PUBLISH and "
                             "LABPILOT_STREAM_SUBSCRIBE) or neither (an embedded loopback proxy)")
        self.ledger, self.campaign_id = ledger, campaign_id
        self.proxy: Proxy | None = None
        self.publish_address, self.subscribe_address = publish, subscribe
        self.publisher: Publisher | None = None

    def start(self) -> CampaignStream:
        if self.publish_address is None:
            self.proxy = Proxy().start()
            self.publish_address = self.proxy.publish_address
            self.subscribe_address = self.proxy.subscribe_address
        self.publisher = Publisher(self.publish_address, name=f"campaign-{self.campaign_id}")
        self.ledger.listeners.append(self._relay)
        return self

    def _relay(self, topic: str, body: dict[str, Any]) -> None:
        if self.publisher is not None:
            self.publisher.publish(topic, body)

    def on_document(self, name: str, doc: dict[str, Any]) -> None:
        """The RunEngines' callback: every document onto the bus."""
        if self.publisher is not None:
            self.publisher.publish("doc", {"name": name, "doc": doc})

    def subscriber(self, topics: tuple[str, ...]) -> Subscriber:
        assert self.subscribe_address is not None, "start() the stream first"
        return Subscriber(self.subscribe_address, topics=topics)

    def stop(self) -> None:
        if self._relay in self.ledger.listeners:
            self.ledger.listeners.remove(self._relay)
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None


def completed_results(ledger: Ledger, campaign_id: int) -> list[tuple[int, dict[str, Any], dict[str, float]]]:
    """``(trial id, parameters, outcomes)`` of every completed trial in the ledger."""
    return [(t.id, dict(t.parameters), dict(t.observation.values))
            for t in ledger.trials(campaign_id, ("completed",)) if t.observation is not None]


def next_version_number(ledger: Ledger, campaign_id: int) -> int:
    """The number of the campaign's next model version: after every version its ledger holds."""
    return max((v.number for v in ledger.model_versions(campaign_id)), default=0) + 1


class LedgerCheck:
    """A bluesky callback between the stream and the trainer: every document goes through, but a
    run's result reaches the trainer only when the ledger holds that run as a trial of this
    campaign (the trainer trains on results the ledger holds, never on what merely arrived).

    At the run's stop document its start must name a ``trial_id`` of this campaign whose state
    is ``running`` or ``completed`` (the flow writes ``running`` before the run starts, and the
    stop may arrive before the ledger records the completion), whose parameters are the start's,
    and, once the ledger has recorded the run's uid, the same uid. Otherwise the run is counted
    in :attr:`untrusted`, logged on ``labpilot.learning`` and forgotten by the trainer.

    This checks plausibility against the ledger, not who sent the documents: anyone who can
    reach the proxy can still repeat a real run's documents. Authenticated publishers (ZeroMQ
    CURVE keys per station) belong to the multi-host deployment, a later step.
    """

    TRUSTED_STATES = ("running", "completed")

    def __init__(self, trainer: Any, ledger: Ledger, campaign_id: int, max_open_runs: int = 10_000) -> None:
        self.trainer, self.ledger, self.campaign_id = trainer, ledger, campaign_id
        self.max_open_runs = max_open_runs
        self.untrusted = 0
        self._starts: dict[str, dict[str, Any]] = {}  # run uid -> its start document

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start" and isinstance(doc.get("uid"), str):
            if len(self._starts) >= self.max_open_runs:  # starts never stopped (forged, or a crash)
                oldest = next(iter(self._starts))
                del self._starts[oldest]
                self._forget(oldest)
            self._starts[doc["uid"]] = doc
        elif name == "stop" and isinstance(doc.get("run_start"), str):
            uid = doc["run_start"]
            start = self._starts.pop(uid, None)
            # a failed run yields no training point, only a failure count: not worth a ledger read
            if start is not None and doc.get("exit_status") == "success":
                why = self.untrusted_because(start)
                if why:
                    self.untrusted += 1
                    log.warning("trainer: not training on run %s: %s (%d untrusted runs so far)",
                                uid, why, self.untrusted)
                    self._forget(uid)
                    return
        self.trainer(name, doc)

    def untrusted_because(self, start: dict[str, Any]) -> str:
        """Why the run this start document opened is not a result of the campaign ("" if it is)."""
        trial_id = start.get("trial_id")
        if not isinstance(trial_id, int) or isinstance(trial_id, bool):
            return f"its trial_id {trial_id!r} is not a trial id"
        try:
            trial = self.ledger.trial(trial_id)
        except LookupError:
            return f"the ledger has no trial {trial_id}"
        if trial.campaign_id != self.campaign_id:
            return f"trial {trial_id} belongs to campaign {trial.campaign_id}, not {self.campaign_id}"
        if trial.state not in self.TRUSTED_STATES:
            return f"trial {trial_id} is {trial.state} in the ledger, not running or completed"
        if dict(trial.parameters) != start.get("parameters"):
            return f"its parameters {start.get('parameters')!r} are not trial {trial_id}'s {dict(trial.parameters)!r}"
        if trial.run_uid is not None and trial.run_uid != start.get("uid"):
            return f"trial {trial_id} was measured by run {trial.run_uid}, not this one"
        return ""

    def _forget(self, uid: str) -> None:
        forget = getattr(self.trainer, "forget", None)
        if forget is not None:
            forget(uid)


def feed_trainer(trainer: Any, ledger: Ledger, campaign_id: int, subscriber: Subscriber,
                 check: LedgerCheck | None = None) -> Listener:
    """Start ``trainer`` on a campaign: the results the ledger already holds first, then every
    run's documents from ``subscriber`` (which takes the ``doc`` topic), through ``check`` (a
    :class:`LedgerCheck` of its own unless given) so that only runs the ledger holds are
    trained on; returns the listener."""
    trainer.catch_up(completed_results(ledger, campaign_id))
    check = check or LedgerCheck(trainer, ledger, campaign_id)
    listener = Listener(subscriber, document_callback(check), name="labpilot-trainer-intake").start()
    trainer.start()
    return listener


class LiveModels:
    """The newest surrogate model version for the planner (``latest()``), kept current from the
    stream; every version is recorded in the ledger and announced on the bus."""

    def __init__(self, stream: CampaignStream, problem: Any, directory: str | Path, mode: str = "inprocess",
                 outcome_keys: dict[str, str] | None = None, switch_at: int = 1000,
                 wait_seconds: float = 30.0) -> None:
        if mode not in ("inprocess", "external"):
            raise ValueError(f"trainer mode {mode!r}: use 'inprocess', 'external' or 'off'")
        self.stream, self.mode = stream, mode
        self.ledger, self.campaign_id = stream.ledger, stream.campaign_id
        self.trainer = None
        self._latest = None
        self._lock = threading.Lock()
        #: how long ``latest(results=n)`` waits for a version trained on ``n`` results
        self.wait_seconds = float(wait_seconds)
        #: asks that went ahead on an older version because the trainer was late (the
        #: campaign's decisions then depend on its timing; the proposal records what it used)
        self.late = 0
        if mode == "inprocess":
            from planners.surrogates import SurrogateTrainer

            self.trainer = SurrogateTrainer(problem, directory, outcome_keys=outcome_keys, switch_at=switch_at,
                                            on_version=self._announce,
                                            first_number=next_version_number(self.ledger, self.campaign_id))
        self.listener: Listener | None = None

    def start(self) -> LiveModels:
        if self.trainer is not None:
            sub = self.stream.subscriber(("doc",))
            assert self.stream.publisher is not None
            sub.wait_linked(self.stream.publisher)
            self.listener = feed_trainer(self.trainer, self.ledger, self.campaign_id, sub)
        else:
            rows = self.ledger.model_versions(self.campaign_id)
            if rows:
                self._load(rows[-1].record)
            sub = self.stream.subscriber(("model",))
            assert self.stream.publisher is not None
            sub.wait_linked(self.stream.publisher)
            self.listener = Listener(sub, self._on_model, name="labpilot-model-follower").start()
        return self

    def _announce(self, version: Any) -> None:
        self.ledger.record_model_version(self.campaign_id, version.record())

    def _on_model(self, msg: Message) -> None:
        if msg.body.get("campaign_id") == self.campaign_id:
            self._load(msg.body)

    def _load(self, record: dict[str, Any]) -> None:
        from planners.surrogates.trainer import load_version

        try:
            version = load_version(record)
        except Exception as exc:  # noqa: BLE001 - keep the last good version
            log.warning("could not load model version %s from %s: %s", record.get("number"),
                        record.get("path"), exc)
            return
        with self._lock:
            if self._latest is None or version.number > self._latest.number:
                self._latest = version

    def latest(self, results: int | None = None) -> Any:
        """The newest version. With ``results`` (the completed results the planner holds), first
        wait up to ``wait_seconds`` for a version trained on all of them: a live trainer's speed
        must not change what a campaign decides, so two runs with the same seed and instruments
        make the same decisions (when the trainer is later than that, the ask goes ahead on the
        version there is, which the proposal records, and :attr:`late` counts it)."""
        min_points = self.trainer.min_points if self.trainer is not None else 3
        if results is None or results < min_points or self.wait_seconds <= 0:
            return self._newest()
        deadline = time.monotonic() + self.wait_seconds
        while True:
            version = self._newest()
            if version is not None and version.n_points >= results:
                return version
            if time.monotonic() >= deadline or (self.trainer is not None and self.trainer.errors):
                self.late += 1
                log.warning("the surrogate trainer has no version on %d results after %.0f s; proposing "
                            "from %s", results, self.wait_seconds, getattr(version, "label", "no version"))
                return version
            time.sleep(0.005)

    def _newest(self) -> Any:
        if self.trainer is not None:
            return self.trainer.latest()
        with self._lock:
            return self._latest

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        if self.trainer is not None:
            self.trainer.stop()


class FixedModels:
    """A surrogate source that always gives one version: to replay a recorded decision."""

    def __init__(self, version: Any) -> None:
        self.version = version

    def latest(self, results: int | None = None) -> Any:
        return self.version


def recorded_version(ledger: Ledger, campaign_id: int, label: str | None) -> Any:
    """The model version a proposal names (``gp-v7``, ``ensemble-v12+3fx1.5``), loaded from its
    checkpoint; ``None`` when the proposal came from the planner's own fit (``gp-35``)."""
    import re

    match = re.search(r"-v(\d+)", label or "")
    if match is None:
        return None
    number = int(match.group(1))
    for row in ledger.model_versions(campaign_id):
        if row.number == number:
            from planners.surrogates.trainer import load_version

            return load_version(row.record)
    raise LookupError(f"the ledger has no model version {number} (named by proposal {label!r})")
