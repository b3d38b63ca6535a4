"""The Prefect flow and tasks that drive the loop: ask, record, gate, run, read, record, repeat.

Dispatch keeps every instrument busy: whenever one is free the planner is
asked for as many trials as there are free instruments (running trials are
passed as pending points), each is written to the ledger, passed through the
safety gate and submitted as a Prefect task; results are recorded the moment
each finishes. Every change of state is written to the ledger before it
happens, and its outcome after, so a crash resumes with nothing lost and
nothing run twice.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from instruments import Instrument, InstrumentRunner, InstrumentTimeout, MeasurementError
from instruments.runner import INTERLOCK_ERRORS
from orchestrator.approval import waits_because
from orchestrator.control import Applier
from orchestrator.interrupt import INTERRUPT
from orchestrator.learning import CampaignStream, LiveModels
from orchestrator.ledger import APPROVAL_TIMEOUT, CampaignRefused, Ledger, utcnow
from orchestrator.report import Best, best_so_far
from orchestrator.safety import check_dispatch, check_point
from orchestrator.settings import Settings
from orchestrator.spec import Budget, CampaignSpec, InstrumentSpec
from planners import Planner, Proposal, make_planner

log = logging.getLogger("labpilot")

MAX_CONSECUTIVE_VETOES = 25
#: the trial id on ``done_q`` of the planner's answer asked ahead (not a trial)
AHEAD = -1
#: seconds between the loop's looks at the ledger for operator commands when nothing finishes
POLL_SECONDS = 0.1
#: the campaign's lock: renewed every LOCK_RENEW seconds, lapses after LOCK_LEASE without renewal
LOCK_LEASE, LOCK_RENEW = 60.0, 5.0
#: what makes a campaign the campaign it is: a resumed run whose file changes one of these is refused
IDENTITY_FIELDS = ("parameters", "constraints", "objectives", "outcome_constraints", "seed")


def _lock_owner() -> str:
    import os
    import socket
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _holder_is_dead(owner: str) -> bool:
    """A lock holder on this host whose process is gone (SIGKILL leaves its lease behind)."""
    import os
    import socket

    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host: only the lease's expiry says it is gone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) != os.getpid() and _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _spec_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


class DocumentJournal:
    """A RunEngine callback that writes every document of a trial's run to the ledger as it is
    emitted (before the run returns), so a result survives a crash right after the measurement."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._trial_of_run: dict[str, int] = {}
        self._trial_of_descriptor: dict[str, int] = {}

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            if doc.get("trial_id") is None:
                return  # not a trial's run
            trial = self._trial_of_run[doc["uid"]] = int(doc["trial_id"])
        elif name == "event":
            trial = self._trial_of_descriptor.get(doc.get("descriptor", ""))
        else:  # descriptor, stop
            trial = self._trial_of_run.get(doc.get("run_start", ""))
        if trial is None:
            return
        if name == "descriptor":
            self._trial_of_descriptor[doc["uid"]] = trial
        self.ledger.record_document(trial, name, doc)
        if name == "stop":
            run = doc.get("run_start", "")
            self._trial_of_run.pop(run, None)
            self._trial_of_descriptor = {d: t for d, t in self._trial_of_descriptor.items() if t != trial}


class CampaignObserver:
    """Receives the campaign's progress (the terminal display, the console). All no-ops here."""

    def started(self, runtime: CampaignRuntime) -> None: ...
    def trial_changed(self, runtime: CampaignRuntime, number: int, state: str, info: str = "") -> None: ...
    def finished(self, runtime: CampaignRuntime, result: CampaignResult) -> None: ...


@dataclass
class TrialOutcome:
    """What a run-trial task hands back to the flow."""

    trial_id: int
    state: str  # "completed", "failed", or "abandoned" (an interlock kept it from being measured)
    values: dict[str, float] = field(default_factory=dict)
    run_uid: str | None = None
    reason: str = ""
    seconds: float = 0.0
    units: dict[str, str] = field(default_factory=dict)


@dataclass
class CampaignResult:
    campaign_id: int
    output_dir: Path
    status: str
    reason: str
    counts: dict[str, int]
    best: Best
    seconds: float
    timings: dict[str, list[float]]


def build_runners(spec: CampaignSpec, on_document=None, on_event=None) -> list[InstrumentRunner]:
    """One runner (one RunEngine) per instrument station; ``concurrency: k`` makes k stations.
    Each station gets its own interlocks (``suspend_when``); ``on_event(kind, body)`` hears of
    their suspensions and of failed read attempts (:class:`InstrumentRunner`)."""
    from instruments.binding import RetryPolicy

    runners = []
    for inst in spec.instruments:
        for name in inst.stations:
            takes = spec.takes(inst)
            device, outcomes = _make_device(inst, name, seed=spec.seed * 1000 + len(runners),
                                            parameters=[p for p in spec.parameters if p.name in takes], spec=spec)
            timeout = inst.timeout
            if inst.kind == "manual" and "timeout" not in inst.model_fields_set:
                from instruments.manual import MANUAL_TIMEOUT

                timeout = MANUAL_TIMEOUT  # a person's measurement takes what it takes
            runners.append(InstrumentRunner(
                Instrument(name=name, device=device, outcomes=outcomes, timeout=timeout,
                           units=inst.declared_units(), retry=RetryPolicy(inst.retry.reads, inst.retry.delay)),
                on_document=on_document, interlocks=_interlocks(inst), on_event=on_event,
            ))
    return runners


def _interlocks(inst: InstrumentSpec) -> list[Any]:
    """The instrument's ``suspend_when`` as interlocks on EPICS PVs (connected, or refused)."""
    if not inst.suspend_when:
        return []
    from instruments.interlock import epics_interlock  # sets the loopback EPICS environment first

    wait = inst.epics.connection_timeout if inst.epics is not None else 5.0
    return [epics_interlock(i.pv, i.min, i.max, resume_after=i.resume_after, max_wait=i.max_wait,
                            connection_timeout=wait) for i in inst.suspend_when]


def is_manual(runner: InstrumentRunner) -> bool:
    """The runner's instrument is a person (``kind: manual``)."""
    from instruments.manual import ManualInstrumentBase

    return isinstance(runner.instrument.device, ManualInstrumentBase)


def _make_device(inst: InstrumentSpec, name: str, seed: int, parameters: list[Any] = (),
                 spec: CampaignSpec | None = None) -> tuple[Any, list[str]]:
    if inst.kind == "manual":
        from instruments.manual import make_manual_device

        return make_manual_device(name.replace("-", "_"), list(parameters), list(inst.outcomes or [])), \
            list(inst.outcomes or [])
    if inst.epics is not None:
        # imported here: it sets the loopback EPICS environment before pyepics loads
        from instruments.epics import make_epics_device

        return make_epics_device(name.replace("-", "_"), inst.epics, list(parameters), units=inst.units), \
            list(inst.outcomes or [])
    if inst.device:
        import importlib

        module, _, attr = inst.device.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        return factory(name=name.replace("-", "_")), list(inst.outcomes or [])
    from orchestrator.rehearsal import simulated_problem
    from simulators import Behaviour, make_simulated_device

    problem = simulated_problem(inst, spec, seed)
    behaviour = Behaviour(latency=inst.latency, noise=inst.noise, drift=inst.drift,
                          failure_rate=inst.failure_rate, hang_rate=inst.hang_rate, seed=seed)
    device = make_simulated_device(problem, name.replace("-", "_"), behaviour)
    return device, list(inst.outcomes or problem.outcomes)


@task(name="propose", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def propose(planner: Planner, n: int, history: list, pending: list[dict[str, Any]],
            state: dict[str, Any] | None = None) -> list[Proposal]:
    """Ask the planner for ``n`` proposals (retried: a numerical hiccup should not end a night's run)."""
    return planner.ask(n, history, pending, state=state)


@task(name="run-trial", cache_policy=NO_CACHE, retries=0)
def run_trial(runner: InstrumentRunner, trial_id: int, parameters: dict[str, Any],
              md: dict[str, Any]) -> TrialOutcome:
    """Run one trial's plan on its instrument and read the observation.

    Not retried on purpose: a rerun of a physical experiment consumes material
    and instrument time, so a failure is recorded as data instead. No
    ``timeout_seconds`` here: Prefect cannot interrupt a blocking call in a
    worker thread (it says so itself), so the timeout is the runner's watchdog,
    which aborts the bluesky run and leaves a stop document saying why.
    """
    t0 = time.perf_counter()
    try:
        obs, _docs = runner.run(parameters, md)
    except INTERLOCK_ERRORS as exc:  # not the point's fault: no outcome, and nothing to learn
        return TrialOutcome(trial_id, "abandoned", reason=str(exc), seconds=time.perf_counter() - t0)
    except InstrumentTimeout as exc:
        return TrialOutcome(trial_id, "failed", reason=str(exc), seconds=time.perf_counter() - t0)
    except MeasurementError as exc:
        return TrialOutcome(trial_id, "failed", reason=f"measurement failed: {exc}",
                            seconds=time.perf_counter() - t0)
    return TrialOutcome(trial_id, "completed", values=obs.values, run_uid=obs.run_uid,
                        seconds=time.perf_counter() - t0, units=dict(obs.units))


class CampaignRuntime:
    """Everything one campaign run holds: spec, ledger, planner, instrument runners."""

    def __init__(self, spec: CampaignSpec, output_dir: str | Path,
                 observer: CampaignObserver | None = None, on_document=None,
                 settings: Settings | None = None) -> None:
        self.spec = spec
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        settings = settings or Settings()
        self.ledger = Ledger.for_directory(self.output_dir, spec.store or settings.ledger_url)
        spec_json = spec.model_dump(mode="json")
        self.campaign_id, self.resumed = self.ledger.open_campaign(spec.name, spec_json, spec.seed)
        recorded = self.ledger.campaign(self.campaign_id).spec or {}
        changed = _spec_differences(recorded, spec_json) if self.resumed else {}
        what = [k for k in changed if k in IDENTITY_FIELDS]
        if what:
            raise CampaignRefused(
                f"campaign {spec.name!r} in {self.ledger.url} was recorded with other {', '.join(what)}; a "
                "resumed campaign must keep what it optimises (its planner's history would not fit). "
                "Change it back, or run the new file under another name or --output (--fresh discards "
                f"the old record). Recorded: {', '.join(f'{k}={changed[k][0]}' for k in what)}")
        self.lock_owner = _lock_owner()
        holder = self.ledger.acquire(self.campaign_id, self.lock_owner, LOCK_LEASE, _holder_is_dead)
        if holder is not None:
            raise CampaignRefused(
                f"campaign {spec.name!r} is being run by {holder} (its lease is renewed every "
                f"{LOCK_RENEW:g} s and lapses {LOCK_LEASE:g} s after its holder stops); wait for it to "
                "finish, or stop it first")
        try:
            if changed:  # safe changes (budget, envelope, instruments, ...): taken, and recorded
                log.warning("campaign %s: the file changed on resume: %s", spec.name, changed)
                self.ledger.accept_spec_change(self.campaign_id, spec_json, changed)
            self.spec = spec = self._operator_budget(spec)
            self._build(spec, settings, observer, on_document)
        except BaseException:
            self.ledger.release(self.campaign_id, self.lock_owner)
            raise

    def _operator_budget(self, spec: CampaignSpec) -> CampaignSpec:
        """The budget an operator set while it ran (``labpilot budget``, the console) outlives a
        restart, unless the campaign file's budget was edited since: then the newer word wins."""
        override = self.ledger.campaign(self.campaign_id).budget_override
        if not override:
            return spec
        if override.get("file_budget") != spec.budget.model_dump(mode="json"):
            log.warning("campaign %s: the file's budget changed since an operator set one; the file's is "
                        "taken", spec.name)
            self.ledger.update_campaign(self.campaign_id, budget_override=None)
            return spec
        return spec.model_copy(update={"budget": Budget.model_validate(override["budget"])})

    def _build(self, spec: CampaignSpec, settings: Settings, observer: CampaignObserver | None,
               on_document: Any) -> None:
        self.wall_before = float(self.ledger.campaign(self.campaign_id).wall_seconds or 0.0)
        self.problem = spec.problem()
        self.planner = make_planner(spec.planner.name, self.problem, spec.seed, spec.planner.options)
        # The bus first (it relays the ledger's news from now on), then the RunEngines on it.
        self.stream = CampaignStream(self.ledger, self.campaign_id, settings.stream_publish,
                                     settings.stream_subscribe).start()
        # where the console (any process) follows this run live
        self.ledger.update_campaign(self.campaign_id, stream_address=self.stream.subscribe_address)
        # the ledger's journal first: a document is recorded before anyone else sees it
        callbacks = [DocumentJournal(self.ledger), self.stream.on_document] + ([on_document] if on_document else [])
        self.runners = build_runners(spec, lambda name, doc: [cb(name, doc) for cb in callbacks],
                                     on_event=self._instrument_event)
        self.models: LiveModels | None = None
        # The live trainer reads each run's documents as a whole trial; a trial of several steps
        # (instruments that split the work) is several runs, so its planner fits its own model
        # from the ledger's history instead.
        if settings.trainer != "off" and getattr(self.planner, "accepts_surrogates", False) \
                and len(spec.steps()) == 1:
            self.models = LiveModels(self.stream, self.problem, self.output_dir, settings.trainer,
                                     switch_at=settings.surrogate_switch_at,
                                     wait_seconds=settings.trainer_wait).start()
            self.planner.surrogate_source = self.models
        self.observer = observer or CampaignObserver()
        self.timings: dict[str, list[float]] = {"propose": [], "instrument": [], "overhead": []}
        self.stop_requested = threading.Event()

    def _instrument_event(self, kind: str, body: dict[str, Any]) -> None:
        """A runner's news (an interlock tripped or cleared, a read attempt failed), into the
        ledger, which tells the stream."""
        at = datetime.fromtimestamp(body["at"], UTC)
        if kind == "suspension" and body["what"] == "tripped":
            self.ledger.record_suspension(self.campaign_id, body["instrument"], body["pv"], body["allowed"],
                                          body["value"], body["trial_id"], at)
        elif kind == "suspension":
            self.ledger.clear_suspension(self.campaign_id, body["instrument"], body["pv"], body["value"], at,
                                         body["resume_after"])
        elif kind == "retry":
            self.ledger.record_retry(self.campaign_id, body["trial_id"], body["instrument"], body["step"],
                                     body["attempt"], body["of"], body["error"], at)

    def close(self) -> None:
        """Stop the trainer and the stream and let go of the campaign (the ledger stays open)."""
        runners = getattr(self, "runners", [])
        deadline = time.monotonic() + 2.0  # aborted runs wind down first (ABORT_GRACE_S each, at most)
        for runner in runners:
            # its interlocks stop reporting into this campaign
            runner.close(settle=max(0.0, deadline - time.monotonic()))
        if self.models is not None:
            self.models.stop()
        self.stream.stop()
        try:
            self.ledger.update_campaign(self.campaign_id, stream_address=None)
        finally:
            self.ledger.release(self.campaign_id, self.lock_owner)

    def best(self) -> Best:
        ref = None
        if len(self.spec.objectives) > 1:
            ref = self._reference_point()
        return best_so_far(self.ledger.history(self.campaign_id), self.spec.objectives,
                           self.spec.outcome_constraints, ref)

    def _reference_point(self) -> list[float] | None:
        # A simulator with a published reference point gives comparable hypervolumes.
        from orchestrator.rehearsal import known_optimum

        optimum = known_optimum(self.spec)
        refs = [optimum.get(f"ref_{o.name}") for o in self.spec.objectives]
        return None if any(r is None for r in refs) else refs  # type: ignore[return-value]

    def recover(self) -> None:
        """Bring a resumed campaign to a consistent state before dispatching anything.

        A trial left ``running`` by a crash: if its run's stop document is in the ledger (the
        journal writes each document as it is emitted), the run finished and its result is
        read from the documents and recorded (completed, or failed as the run says). Otherwise
        it may have run on the hardware, so it is abandoned (never rerun). A trial on a ``kind:
        manual`` instrument stays running: a person is measuring it, and the dispatcher waits
        for their result again. ``proposed`` and ``approved`` trials never reached an instrument
        and are dispatched as they are (a proposal waiting for approval goes on waiting).
        """
        readers = {r.instrument.name: r.instrument for r in self.runners}
        manual = {r.instrument.name for r in self.runners if is_manual(r)}
        stepped = len(self.spec.steps()) > 1
        for t in self.ledger.trials(self.campaign_id, ("running",)):
            if stepped:  # a trial of several steps: orchestrator.flows.recover_steps
                recover_steps(self, t, readers)
                continue
            if t.instrument in manual:
                continue  # a person is measuring it: it waits for their result (the dispatcher re-attaches it)
            docs = self.ledger.documents(t.id)
            stop = next((d for n, d in docs if n == "stop"), None)
            inst = readers.get(t.instrument or "")
            if stop is not None and inst is not None:
                if stop.get("exit_status") == "success":
                    try:
                        obs = inst.result(docs)  # type: ignore[misc]
                    except MeasurementError as exc:
                        self.ledger.transition(t.id, "failed", "system", f"measurement failed: {exc}")
                        continue
                    self.ledger.complete(t.id, obs.values, obs.run_uid, units=obs.units, reason=(
                        "measured; recorded on resume from the run's documents (the campaign stopped "
                        "after the measurement)"))
                else:
                    self.ledger.transition(t.id, "failed", "system",
                                           f"the run ended {stop.get('exit_status')}: {stop.get('reason', '')}")
                continue
            self.ledger.transition(t.id, "abandoned", "system",
                                   "the campaign stopped while this trial ran; not rerun, since it may "
                                   "have used material; re-queue it by hand if it did not")


def _step_documents(docs: list[tuple[str, dict[str, Any]]], step: int) -> list[tuple[str, dict[str, Any]]]:
    """The documents of a trial's run for ``step`` (its start document says the step)."""
    uids = {d["uid"] for n, d in docs if n == "start" and d.get("step") == step}
    descriptors = {d["uid"] for n, d in docs if n == "descriptor" and d.get("run_start") in uids}
    return [(n, d) for n, d in docs if (n == "start" and d.get("uid") in uids)
            or (n in ("descriptor", "stop") and d.get("run_start") in uids)
            or (n == "event" and d.get("descriptor") in descriptors)]


def recover_steps(runtime: CampaignRuntime, t: Any, readers: dict[str, Instrument]) -> None:
    """A trial of several steps left ``running`` by a crash. Its last step, if it was mid-run: a
    run whose stop document is in the ledger is finished from its documents, as recover() does;
    one without may have used material, so the trial is abandoned (never rerun). After a
    finished step, the trial continues at its next step (the dispatcher queues it), or, after
    the last, is completed with what every step measured. A finished step is never rerun."""
    ledger = runtime.ledger
    n_steps = len(runtime.spec.steps())
    rows = ledger.steps(t.id)
    last = rows[-1] if rows else None
    if last is not None and last.state == "running":
        docs = _step_documents(ledger.documents(t.id), last.step)
        stop = next((d for n, d in docs if n == "stop"), None)
        inst = readers.get(last.station)
        if stop is None or inst is None:
            ledger.finish_step(last.id, "abandoned", reason="the campaign stopped during this step")
            ledger.transition(t.id, "abandoned", "system", f"the campaign stopped during step {last.step + 1} "
                              f"(on {last.station}); not rerun, since it may have used material; re-queue it "
                              "by hand if it did not")
            return
        try:
            if stop.get("exit_status") != "success":
                raise MeasurementError(f"the run ended {stop.get('exit_status')}: {stop.get('reason', '')}")
            obs = inst.result(docs)  # type: ignore[misc]
        except MeasurementError as exc:
            ledger.finish_step(last.id, "failed", reason=str(exc))
            ledger.transition(t.id, "failed", "system", f"step {last.step + 1} on {last.station}: {exc}")
            return
        ledger.finish_step(last.id, "completed", obs.values, obs.run_uid,
                           "measured; recorded on resume from the run's documents")
        rows = ledger.steps(t.id)
        last = rows[-1]
    if last is None or last.state == "abandoned":
        ledger.transition(t.id, "abandoned", "system", "the campaign stopped before this trial's step ran; "
                          "not rerun; re-queue it by hand")
    elif last.state == "failed":
        ledger.transition(t.id, "failed", "system", f"step {last.step + 1} on {last.station}: {last.reason}")
    elif last.step + 1 == n_steps:
        values = {k: v for r in rows if r.state == "completed" for k, v in r.values.items()}
        ledger.complete(t.id, values, last.run_uid or "", reason="measured; recorded on resume (the campaign "
                        "stopped after the last step)")
    # else: completed a step before the last; the dispatcher continues it at the next


@flow(name="labpilot-campaign", persist_result=False, validate_parameters=False, log_prints=False)
def campaign_flow(runtime: CampaignRuntime) -> CampaignResult:
    """The closed loop for one campaign, until its budget is spent or it is stopped."""
    t_start = time.monotonic()
    runtime.recover()
    runtime.ledger.mark_running(runtime.campaign_id)
    runtime.observer.started(runtime)
    loop = _Dispatcher(runtime, t_start)
    loop.lease.start()
    try:
        status, reason = loop.run()
    except KeyboardInterrupt:
        # Ctrl-C is the operator stopping the campaign, not a crash: record it and return, so the
        # flow run ends as Prefect's "completed" at once instead of reporting a crash
        loop.interrupt("interrupted by the operator (Ctrl-C)")
        status, reason = "interrupted", "interrupted by the operator (Ctrl-C)"
        runtime.ledger.finish_campaign(runtime.campaign_id, "stopped", reason)
    else:
        runtime.ledger.finish_campaign(runtime.campaign_id, status, reason)
    finally:
        loop.lease.stop()
    result = CampaignResult(runtime.campaign_id, runtime.output_dir, status, reason,
                            runtime.ledger.counts(runtime.campaign_id), runtime.best(),
                            time.monotonic() - t_start, runtime.timings)
    runtime.observer.finished(runtime, result)
    return result


class _Lease(threading.Thread):
    """Renews the campaign's lock every LOCK_RENEW seconds and records its wall time so far, on a
    thread of its own, so a long proposal cannot let the lease lapse."""

    def __init__(self, runtime: CampaignRuntime, wall_seconds: Any) -> None:
        super().__init__(name="labpilot-lease", daemon=True)
        self.rt, self.wall_seconds = runtime, wall_seconds
        self._stop_event = threading.Event()
        self.lost = threading.Event()
        self.lost_to = ""

    def run(self) -> None:
        while not self._stop_event.wait(LOCK_RENEW):
            self.renew()

    def renew(self) -> None:
        try:
            if not self.rt.ledger.renew(self.rt.campaign_id, self.rt.lock_owner, LOCK_LEASE, self.wall_seconds()):
                self.lost_to = self.rt.ledger.campaign(self.rt.campaign_id).lock_owner or "another process"
                self.lost.set()
        except Exception:  # noqa: BLE001 - a database hiccup: try again at the next renewal
            log.exception("could not renew the campaign's lock")

    def stop(self) -> None:
        self._stop_event.set()
        self.renew()  # the last wall time


class _Dispatcher:
    """The loop's state: free stations, trials in flight, proposals waiting for a person, the
    operator's pause and stop, failure and veto streaks. It carries out operator commands
    (orchestrator.control) between steps."""

    def __init__(self, runtime: CampaignRuntime, t_start: float) -> None:
        self.rt = runtime
        self.ledger, self.cid, self.spec = runtime.ledger, runtime.campaign_id, runtime.spec
        self.t_start = t_start
        self.lease = _Lease(runtime, self.wall_seconds)
        self.done_q: queue.Queue[tuple[InstrumentRunner, int, Any]] = queue.Queue()
        #: stations out of rotation (taken out after failing, or by an operator): station -> why
        self.out = {k: e.reason for k, e in self.ledger.out_of_rotation(self.cid).items()}
        self._init_steps(runtime.runners)
        #: free stations of the first step, which new trials start on (every station, in one step)
        self.free = [r for r in runtime.runners if r.instrument.name not in self.out and self.step_of[r.instrument.name] == 0]
        self.in_flight: dict[int, dict[str, Any]] = {}  # trial id -> parameters
        self.numbers: dict[int, int] = {}  # trial id -> trial number, of those in flight
        self.station: dict[int, InstrumentRunner] = {}  # trial id -> its station, of those in flight
        self.consecutive_failures = 0
        self.consecutive_vetoes = 0
        campaign = self.ledger.campaign(self.cid)
        self.paused = bool(campaign.paused)
        self.stop_text = ""
        #: trials an operator abandoned while they ran: trial id -> reason (recorded when the run ends)
        self.abandoning: dict[int, str] = {}
        #: manual trials let go of when the campaign stops: they stay running, with the person
        self.detached: set[int] = set()
        # Trials a crashed run had approved but never started, and those an operator approved.
        waiting = self.ledger.trials(self.cid, ("proposed", "approved"))
        self.backlog = [t.id for t in waiting if not t.awaiting]
        #: proposals waiting for a person: trial id -> (trial number, parameters)
        self.waiting: dict[int, tuple[int, dict[str, Any]]] = {}
        self._sync_waiting()
        # Trials a person was measuring when the campaign stopped: they wait for the result again.
        manual = {r.instrument.name for r in runtime.runners if is_manual(r)}
        self.reattach = [t for t in self.ledger.trials(self.cid, ("running",)) if t.instrument in manual]
        self.applier = Applier(self.ledger, self.cid, self)
        self._init_rotation()
        self._continue_steps()
        #: the planner's ask for the next trial, made while every station is busy: (inputs, since)
        self.ahead: tuple[dict[str, Any], float] | None = None
        self._ahead_on = self.asks_ahead()

    # ---- what the operator's commands call (orchestrator.control.Campaign) ----------
    def request_stop(self, reason: str) -> None:
        self.stop_text = reason
        self.rt.stop_requested.set()

    def set_budget(self, budget: dict[str, Any]) -> None:
        old = self.spec.budget
        new = Budget.model_validate({**old.model_dump(), **budget})
        file_budget = Budget.model_validate(self.ledger.campaign(self.cid).spec.get("budget") or {})
        self.spec = self.rt.spec = self.spec.model_copy(update={"budget": new})
        self.ledger.update_campaign(self.cid, budget_override={
            "budget": new.model_dump(mode="json"), "file_budget": file_budget.model_dump(mode="json")})

    def check_point(self, parameters: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        return check_point(parameters, self.rt.problem.space, self.spec.safety)

    def set_rotation(self, station: str, in_rotation: bool, user: str, reason: str) -> str | None:
        runner = next((r for r in self.rt.runners if r.instrument.name == station), None)
        if runner is None:
            return f"this campaign has no station {station!r}"
        if in_rotation != (station in self.out):
            return f"station {station!r} is {'in' if in_rotation else 'out of'} rotation already"
        if in_rotation:
            self._restore(runner, "operator", reason, user)
        else:
            self._retire(station, "operator", reason, user)
        return None

    # ---- stations out of rotation ------------------------------------------------
    # A station whose instrument says ``out_of_rotation_after: N`` is taken out after N failed
    # trials in a row on it (an operator's abandon is not its failure; a success resets the
    # count); it is given no trials until an operator restores it, and its trials go to the
    # others. Its failures count towards the campaign's ``max_consecutive_failures`` only until
    # it is taken out, so one bad station among good ones does not end the campaign, while
    # failures everywhere still do. When every station is out the campaign waits, dispatching
    # nothing (as if paused), until one is restored or the campaign is stopped: ending it would
    # only make the operator start it again, and the ledger and the stream say why it waits.
    def _init_rotation(self) -> None:
        #: failed trials in a row per station, rebuilt from the ledger (since its last change of rotation)
        self.station_streak: dict[str, int] = {}
        #: each station's failures within the campaign's current streak of failures
        self.streak_by_station: dict[str, int] = {}
        self.rotation = {s: inst.out_of_rotation_after for inst in self.spec.instruments for s in inst.stations}
        since = {e.station: e.at.replace(tzinfo=None) for e in self.ledger.station_events(self.cid)}
        done = [t for t in self.ledger.trials(self.cid, ("completed", "failed")) if t.instrument and t.finished_at]
        for t in sorted(done, key=lambda t: (t.finished_at.replace(tzinfo=None), t.id)):
            if t.instrument in since and t.finished_at.replace(tzinfo=None) <= since[t.instrument]:
                continue
            self.station_streak[t.instrument] = self.station_streak.get(t.instrument, 0) + 1 \
                if t.state == "failed" else 0
        for station in list(self.station_streak):  # a crash between the Nth failure and taking it out
            self._check_rotation(station)

    def _station_result(self, station: str, failed: bool) -> None:
        """Count a finished trial's outcome against its station (record() calls it)."""
        if not failed:
            self.station_streak[station] = 0
            self.streak_by_station.clear()  # as the campaign's streak is reset
            return
        self.station_streak[station] = self.station_streak.get(station, 0) + 1
        self.streak_by_station[station] = self.streak_by_station.get(station, 0) + 1
        self._check_rotation(station)

    def _check_rotation(self, station: str) -> None:
        limit, streak = self.rotation.get(station), self.station_streak.get(station, 0)
        if limit is None or station in self.out or streak < limit:
            return
        self._retire(station, "system", f"{streak} trials failed in a row on {station} (out_of_rotation_after: "
                     f"{limit}); its trials go to the other stations until an operator brings it back with "
                     f"'labpilot restore DIR {station}'")
        # its failures are its own, now dealt with: they no longer count towards ending the campaign
        self.consecutive_failures = max(0, self.consecutive_failures - self.streak_by_station.pop(station, 0))

    def _retire(self, station: str, actor: str, reason: str, user: str | None = None) -> None:
        self.out[station] = reason
        pool = self._pool(station)
        pool[:] = [r for r in pool if r.instrument.name != station]
        if all(r.instrument.name in self.out for r in self.rt.runners):
            reason += ("; every station is now out of rotation: the campaign waits, dispatching nothing, "
                       "until an operator restores one ('labpilot restore DIR STATION') or stops it")
        self.ledger.set_rotation(self.cid, station, False, actor, reason, user)
        log.warning("campaign %s: station %s out of rotation: %s", self.spec.name, station, reason)

    def _restore(self, runner: InstrumentRunner, actor: str, reason: str, user: str | None = None) -> None:
        station = runner.instrument.name
        self.out.pop(station, None)
        self.station_streak[station] = 0
        self.streak_by_station.pop(station, None)
        if runner not in self._pool(station) and runner not in self.station.values():
            self._pool(station).append(runner)
        self.ledger.set_rotation(self.cid, station, True, actor, reason, user)
        log.warning("campaign %s: station %s back in rotation: %s", self.spec.name, station, reason)

    def abandon_trial(self, trial_id: int, reason: str) -> str | None:
        if trial_id in self.in_flight and trial_id not in self.station:  # between two of its steps
            self._drop(trial_id, "operator", reason)
            return None
        if trial_id in self.in_flight:
            self.abandoning[trial_id] = reason
            self.station[trial_id].abort(reason)  # its run ends aborted; record() writes it abandoned
            return None
        if trial_id in self.backlog:
            self.backlog.remove(trial_id)
            self.ledger.transition(trial_id, "abandoned", "operator", reason)
            return None
        return f"trial {self.ledger.trial(trial_id).number} is not running in this campaign"

    def tell_result(self, trial_id: int, values: dict[str, float] | None, failed: str | None) -> str | None:
        runner = self.station.get(trial_id)
        if runner is None or not is_manual(runner):
            return f"trial {self.ledger.trial(trial_id).number} is not waiting for a person's result"
        return runner.instrument.device.tell(values, failed)

    # ---- trials in steps (instruments that split the work) ------------------------
    # When the campaign's instruments take different parameters or measure different outcomes,
    # a trial runs through them in the file's order (CampaignSpec.steps): a reactor makes the
    # sample, then a characterisation station measures it. The trial is ``running`` throughout;
    # each step is a row of the ledger's trial_steps (station, parameters sent, times, values),
    # written before its run starts and finished after, and its run's documents are journaled
    # with ``step`` in the start document. A trial waits between steps for a free station of the
    # next one (``step_queue``); new trials start only while no later step has more waiting than
    # it has stations, so samples do not pile up in front of a slow station. Every station is
    # kept busy: the reactor starts the next trial while the station measures the last.
    def _init_steps(self, runners: list[InstrumentRunner]) -> None:
        steps = self.spec.steps()
        self.n_steps = len(steps)
        self.step_of = {station: k for k, group in enumerate(steps) for inst in group for station in inst.stations}
        self.takes = {station: set(self.spec.takes(inst)) for inst in self.spec.instruments for station in inst.stations}
        self.later_free: dict[int, list[InstrumentRunner]] = {
            k: [r for r in runners if self.step_of[r.instrument.name] == k and r.instrument.name not in self.out]
            for k in range(1, self.n_steps)}
        self.step_queue: dict[int, list[int]] = {k: [] for k in range(1, self.n_steps)}
        self.step_values: dict[int, dict[str, float]] = {}  # trial id -> what its finished steps measured
        self.step_row: dict[int, int] = {}  # trial id -> the ledger row of its running step

    def _pool(self, station: str) -> list[InstrumentRunner]:
        """The free list a station goes back to: its step's."""
        k = self.step_of.get(station, 0)
        return self.free if k == 0 else self.later_free[k]

    def _sent(self, station: str, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        """The part of a trial's parameters that ``station`` takes."""
        if parameters is None or self.n_steps == 1 and len(self.takes.get(station, ())) == len(parameters):
            return parameters
        takes = self.takes.get(station)
        return dict(parameters) if takes is None else {k: v for k, v in parameters.items() if k in takes}

    def _continue_steps(self) -> None:
        """Trials a stopped run left between two steps (recover_steps finished their last step):
        each waits for a station of its next step, with what its steps measured so far."""
        if self.n_steps == 1:
            return
        for t in self.ledger.trials(self.cid, ("running",)):
            rows = self.ledger.steps(t.id)
            if rows and rows[-1].state == "completed" and rows[-1].step + 1 < self.n_steps:
                self.in_flight[t.id], self.numbers[t.id] = dict(t.parameters), t.number
                self.step_values[t.id] = {k: v for r in rows if r.state == "completed" for k, v in r.values.items()}
                self.step_queue[rows[-1].step + 1].append(t.id)

    def _step_room(self) -> int:
        """New trials that may start: none while a later step has as many waiting as stations."""
        room = 1 << 30
        for k, waiting in self.step_queue.items():
            stations = sum(1 for r in self.rt.runners if self.step_of[r.instrument.name] == k
                           and r.instrument.name not in self.out)
            room = min(room, stations - len(waiting))
        return max(room, 0)

    def _step_done(self, runner: InstrumentRunner, trial_id: int, outcome: TrialOutcome) -> bool:
        """Record a finished step; True when the trial goes on to a next step (then it waits for
        it), False when record() finishes the trial (its last step, a failure, an abandon), with
        ``outcome.values`` then holding what every step measured."""
        station = runner.instrument.name
        k = self.step_of[station]
        row = self.step_row.pop(trial_id, None)
        state = "abandoned" if trial_id in self.abandoning else outcome.state
        if row is not None:
            self.ledger.finish_step(row, state, outcome.values, outcome.run_uid, outcome.reason)
        values = {**self.step_values.pop(trial_id, {}), **outcome.values}
        if state != "completed" or k + 1 == self.n_steps:
            outcome.values = values
            return False
        self.step_values[trial_id] = values
        self.station.pop(trial_id, None)
        if station not in self.out:
            self._pool(station).append(runner)
        self._station_result(station, failed=False)
        self.step_queue[k + 1].append(trial_id)
        self.rt.observer.trial_changed(self.rt, self.numbers[trial_id], "running", f"step {k + 1} done on {station}")
        return True

    def _advance_steps(self) -> None:
        """Start the trials waiting for a later step on its free stations (station rules apply
        with the parameters the station takes; a trial the rules refuse outright is abandoned:
        its earlier steps ran, so it is not vetoed, and it is not rerun)."""
        safety = self.spec.safety
        for k, waiting in self.step_queue.items():
            while waiting and self.later_free[k]:
                tid = waiting[0]
                runner = self.later_free[k][0]
                if safety.stateful:
                    station = runner.instrument.name
                    last, starts = self._step_history(station)
                    refusal = check_dispatch(self._sent(station, self.in_flight[tid]), station, last, starts,
                                             safety, utcnow(), self._instrument_of(station))
                    if refusal is not None and refusal.retry_after is not None:
                        break
                    if refusal is not None:
                        waiting.pop(0)
                        self._drop(tid, "system", f"step {k + 1} refused by the safety envelope: {refusal}")
                        continue
                waiting.pop(0)
                self.later_free[k].pop(0)
                self._submit_step(runner, tid, k)

    def _step_history(self, station: str) -> tuple[dict[str, Any] | None, list[Any]]:
        rows = [r for r in self.ledger.campaign_steps(self.cid) if r.station == station]
        return (dict(rows[-1].parameters) if rows else None), [r.started_at for r in rows]

    def _submit_step(self, runner: InstrumentRunner, trial_id: int, k: int) -> None:
        station = runner.instrument.name
        sent = self._sent(station, self.in_flight[trial_id])
        number = self.numbers[trial_id]
        self.step_row[trial_id] = self.ledger.start_step(trial_id, k, station, sent)
        self.station[trial_id] = runner
        self.rt.observer.trial_changed(self.rt, number, "running", f"step {k + 1} on {station}")
        md = {"campaign": self.spec.name, "campaign_id": self.cid, "trial_id": trial_id, "trial_number": number,
              "instrument": station, "parameters": sent, "outcome_keys": runner.instrument.data_keys, "step": k}
        fut = run_trial.submit(runner, trial_id, sent, md)
        fut.add_done_callback(lambda f, r=runner, t=trial_id: self.done_q.put((r, t, f)))

    def _drop(self, trial_id: int, actor: str, reason: str) -> None:
        """Abandon a trial waiting between two steps."""
        for waiting in self.step_queue.values():
            if trial_id in waiting:
                waiting.remove(trial_id)
        self.in_flight.pop(trial_id, None)
        self.step_values.pop(trial_id, None)
        number = self.numbers.pop(trial_id)
        self.ledger.transition(trial_id, "abandoned", actor, f"{reason} (between two of its steps; the "
                               "steps it had are in the ledger)")
        self.rt.observer.trial_changed(self.rt, number, "abandoned", reason)

    # ---- steps ---------------------------------------------------------------
    def _sync_waiting(self) -> None:
        self.waiting = {t.id: (t.number, dict(t.parameters))
                        for t in self.ledger.trials(self.cid, ("proposed",)) if t.awaiting}

    def submit(self, runner: InstrumentRunner, trial_id: int, parameters: dict[str, Any],
               reattach: bool = False) -> None:
        """Start the trial on ``runner`` with ``parameters``: what the gate returned, never
        anything it has not seen (``reattach``: a manual trial already running, waiting again)."""
        trial = self.ledger.trial(trial_id)
        if not reattach:
            self.ledger.transition(trial_id, "running", "system", f"started on {runner.instrument.name}",
                                   instrument=runner.instrument.name)
            self.rt.observer.trial_changed(self.rt, trial.number, "running", runner.instrument.name)
        self.in_flight[trial_id] = parameters
        self.numbers[trial_id] = trial.number
        self.station[trial_id] = runner
        if is_manual(runner):
            runner.instrument.device.expect()
        sent = self._sent(runner.instrument.name, parameters)  # what this station takes, no more
        md = {"campaign": self.spec.name, "campaign_id": self.cid, "trial_id": trial_id,
              "trial_number": trial.number, "instrument": runner.instrument.name,
              "parameters": sent, "outcome_keys": runner.instrument.data_keys}
        if self.n_steps > 1:
            self.step_row[trial_id] = self.ledger.start_step(trial_id, 0, runner.instrument.name, sent)
            md["step"] = 0
        fut = run_trial.submit(runner, trial_id, sent, md)
        fut.add_done_callback(lambda f, r=runner, t=trial_id: self.done_q.put((r, t, f)))

    def gate(self, trial_id: int, reason: str | None) -> dict[str, Any] | None:
        """The safety gate: the parameters to send, each of its declared type, or ``None``
        (vetoed, and recorded). Every dispatch passes it, a trial a crashed run or an operator
        had already approved too: the envelope may have been tightened since, an operator's
        point is theirs, and a ledger can be edited by hand. A proposed trial that passes is
        approved by the system for ``reason``; with ``None`` it stays proposed (the approval
        policy decides next)."""
        trial = self.ledger.trial(trial_id)
        point, why = check_point(trial.parameters, self.rt.problem.space, self.spec.safety)
        if why:
            self.ledger.transition(trial_id, "vetoed", "system", why)
            self.rt.observer.trial_changed(self.rt, trial.number, "vetoed", why)
            return None
        if trial.state != "approved" and reason is not None:
            self.ledger.transition(trial_id, "approved", "system", reason)
        return point

    def place(self, trial_id: int, point: dict[str, Any]) -> InstrumentRunner | None:
        """The free station a gated trial starts on (taken from ``free``), checked against the
        envelope's station rules (``max_step``, ``max_trials_per_hour``: safety.check_dispatch)
        with what the ledger says ran on each station, so they hold across restarts. Where no free
        station may take it: if one only waits for the rate rule, the trial goes back to the
        backlog (a later step or another station takes it); else it is vetoed, naming the rules."""
        safety = self.spec.safety
        if not safety.stateful:
            return self.free.pop(0)
        if not self.free:
            self.backlog.append(trial_id)
            return None
        last, starts = self._station_history()
        now, refusals = utcnow(), []
        for r in self.free:
            name = r.instrument.name
            refusal = check_dispatch(self._sent(name, point), name, self._sent(name, last.get(name)),
                                     starts.get(name, ()), safety, now, self._instrument_of(name))
            if refusal is None:
                self.free.remove(r)
                return r
            refusals.append(refusal)
        if any(x.retry_after is not None for x in refusals):
            self.backlog.append(trial_id)  # it waits, approved: never stuck, never run early
            return None
        why = "; ".join(dict.fromkeys(str(x) for x in refusals))
        self.ledger.transition(trial_id, "vetoed", "system", why)
        self.rt.observer.trial_changed(self.rt, self.ledger.trial(trial_id).number, "vetoed", why)
        self.consecutive_vetoes += 1
        return None

    def _station_history(self) -> tuple[dict[str, dict[str, Any]], dict[str, list[Any]]]:
        """From the ledger: each station's last started trial's parameters and its start times."""
        last: dict[str, tuple[Any, int, dict[str, Any]]] = {}
        starts: dict[str, list[Any]] = {}
        for t in self.ledger.trials(self.cid):
            if t.started_at is None or not t.instrument:
                continue
            starts.setdefault(t.instrument, []).append(t.started_at)
            key = (t.started_at.replace(tzinfo=None), t.id)
            if t.instrument not in last or key > last[t.instrument][:2]:
                last[t.instrument] = (*key, dict(t.parameters))
        return {k: v[2] for k, v in last.items()}, starts

    def _instrument_of(self, station: str) -> str:
        """The instrument a station belongs to (``reactor-2`` is a station of ``reactor``)."""
        names = {i.name for i in self.spec.instruments}
        return station if station in names else station.rpartition("-")[0]

    def _open_stations(self) -> int:
        """Free stations the rate rule lets start a trial now."""
        safety = self.spec.safety
        if safety.max_trials_per_hour is None:
            return len(self.free)
        _, starts = self._station_history()
        now = utcnow()
        return sum(check_dispatch({}, r.instrument.name, None, starts.get(r.instrument.name, ()), safety, now,
                                  self._instrument_of(r.instrument.name)) is None for r in self.free)

    def approval_wait(self, trial_id: int, proposal: Proposal) -> bool:
        """Whether a proposal that passed the envelope waits for a person (then it is marked so)."""
        policy = self.spec.approval
        why = waits_because(policy, proposal.parameters, proposal.predicted_mean, proposal.predicted_sd,
                            proposal.ood_score)
        if why is None:
            return False
        deadline = None
        if policy.timeout is not None:
            from datetime import timedelta

            deadline = utcnow() + timedelta(seconds=policy.timeout)
        self.ledger.set_awaiting(trial_id, why, deadline)
        number = self.ledger.trial(trial_id).number
        self.waiting[trial_id] = (number, dict(proposal.parameters))
        self.rt.observer.trial_changed(self.rt, number, "waiting", why)
        return True

    def max_waiting(self) -> int:
        """Proposals that may wait for a person at once: under ``manual`` one per station (every
        proposal waits: asking for more only piles them up); under a policy that holds only some,
        more, so that the proposals that need no one keep the stations busy meanwhile."""
        approval = self.spec.approval
        if approval.max_waiting is not None:
            return approval.max_waiting
        stations = len(self.rt.runners)
        return stations if approval.policy == "manual" else max(10, 2 * stations)

    def expire_waiting(self) -> None:
        """Reject the proposals nobody approved or rejected in time (recorded as such)."""
        timeout = self.spec.approval.timeout
        if not self.waiting or timeout is None:
            return
        now = utcnow()
        for t in self.ledger.trials(self.cid, ("proposed",)):
            deadline = t.wait_deadline
            if deadline is not None and deadline.tzinfo is None:
                deadline = deadline.replace(tzinfo=now.tzinfo)
            if t.awaiting and deadline is not None and deadline <= now:
                self.ledger.set_awaiting(t.id, None)
                self.ledger.transition(t.id, "rejected", "system", f"{APPROVAL_TIMEOUT} after {timeout:g} s: "
                                       "nobody approved or rejected it")
                self.waiting.pop(t.id, None)
                self.rt.observer.trial_changed(self.rt, t.number, "rejected", APPROVAL_TIMEOUT)

    def _free_for(self, manual: bool | None = None) -> InstrumentRunner | None:
        for r in self.free:
            if manual is None or is_manual(r) == manual:
                self.free.remove(r)
                return r
        return None

    def dispatch(self, room: int) -> None:
        """Fill free stations: first the backlog (approved trials), then fresh proposals; a
        proposal the approval policy holds waits for a person (and keeps a station idle only
        when the campaign says ``hold_instrument``)."""
        t_iter = time.perf_counter()
        planner_seconds = 0.0
        pending, self.backlog = self.backlog, []  # place() may put one back: each is tried once a step
        for i, tid in enumerate(pending):
            if not self.free or room <= 0:
                self.backlog.extend(pending[i:])
                break
            point = self.gate(tid, "resumed: passed the safety envelope")
            runner = self.place(tid, point) if point is not None else None
            if runner is not None:
                self.submit(runner, tid, point)
                room -= 1
        approval = self.spec.approval
        held = len(self.waiting) if approval.hold_instrument else 0
        n = min(len(self.free) - held, room - len(self.waiting))
        rate_closed = False
        if self.spec.safety.stateful:  # stations the rate rule keeps closed, and trials waiting for one
            open_now = self._open_stations()
            rate_closed = open_now < len(self.free)
            n = min(open_now - held, n - len(self.backlog))
        if approval.policy != "auto" and len(self.waiting) >= self.max_waiting():
            n = 0  # enough proposals wait for a person; ask for more once they answer
        if self.ahead is not None:
            n = 0  # the planner is already asked, ahead, for the next free station: wait for it
        if n > 0:
            inputs, history, pending, state = self._ask_inputs(n)
            t0 = time.perf_counter()
            proposals = propose(self.rt.planner, n, history, pending, state)
            planner_seconds = time.perf_counter() - t0
            self.rt.timings["propose"].append(planner_seconds)
            self._take(proposals, inputs, ahead=False)
        if (rate_closed or self.backlog) and not self.in_flight and self.spec.safety.stateful:
            time.sleep(POLL_SECONDS)  # the rate rule keeps the stations closed: do not spin on the ledger
        # Orchestration alone: ledger writes, safety gate, task submission (not the planner).
        self.rt.timings["overhead"].append(time.perf_counter() - t_iter - planner_seconds)

    def _ask_inputs(self, n: int) -> tuple[dict[str, Any], list[Any], list[dict[str, Any]], Any]:
        """What the planner is given for ``n`` proposals: the ledger's history, the trials running
        or waiting (as pending points) and the model state of the latest proposal, nothing else;
        the proposal records which, so a decision replays exactly from the ledger
        (orchestrator.replay)."""
        numbered = self.ledger.numbered_history(self.cid)
        state_from, state = self.ledger.latest_model_state(self.cid)
        pending = [(self.numbers[t], p) for t, p in self.in_flight.items()] + list(self.waiting.values())
        inputs = {"history": [k for k, _ in numbered], "pending": [k for k, _ in pending],
                  "pending_points": [p for _, p in pending],
                  "state_from": state_from, "n": n, "trainer": self.rt.models is not None}
        return inputs, [h for _, h in numbered], [p for _, p in pending], state

    def _take(self, proposals: list[Proposal], inputs: dict[str, Any], ahead: bool) -> None:
        """Record the planner's proposals, pass each through the gate and the approval policy, and
        start those that may run on free stations (``ahead``: put them in the backlog, for the
        next station that frees)."""
        approval = self.spec.approval
        for i, p in enumerate(proposals):
            tid = self.ledger.propose(self.cid, p, inputs={**inputs, "index": i, "ahead": ahead})
            point = self.gate(tid, None)
            if point is None:
                self.consecutive_vetoes += 1
                continue
            if self.approval_wait(tid, p):
                self.consecutive_vetoes = 0
                continue
            self.ledger.transition(tid, "approved", "system",
                                   f"passed the safety envelope (approval policy: {approval.policy})"
                                   + ("; proposed ahead, while every station was busy" if ahead else ""))
            if ahead:
                self.backlog.append(tid)
                self.consecutive_vetoes = 0
                continue
            runner = self.place(tid, point)  # None: vetoed by a station rule (counted), or waiting
            if runner is not None:
                self.consecutive_vetoes = 0
                self.submit(runner, tid, point)

    # ---- asking ahead ------------------------------------------------------------
    def asks_ahead(self) -> bool:
        """Whether the planner is asked for the next trial while every station is busy (the
        campaign's ``planner.ask_ahead``; ``auto``: with two stations or more). With one station
        the next proposal would miss the result of the trial running; with several, it misses
        one of several pending results, and no station waits for the planner."""
        setting = self.spec.planner.ask_ahead
        if setting == "auto":
            return len(self.rt.runners) >= 2 and self.n_steps == 1 and self.spec.approval.policy == "auto"
        return bool(setting) and self.n_steps == 1

    def ask_ahead(self) -> None:
        """Ask the planner, on the flow's task runner, for the trial the next free station runs,
        while every station is busy; its answer arrives on ``done_q`` (:meth:`took_ahead`)."""
        if (self.ahead is not None or self.free or self.backlog or self.waiting or not self.in_flight
                or not self._ahead_on):
            return
        # the budget as it is now (the step's dispatch has just started trials): never one too many
        if self.spec.budget.max_trials - self.ledger.runs_done(self.cid) - len(self.in_flight) <= 0:
            return
        inputs, history, pending, state = self._ask_inputs(1)
        self.ahead = (inputs, time.perf_counter())
        fut = propose.submit(self.rt.planner, 1, history, pending, state)
        fut.add_done_callback(lambda f: self.done_q.put((None, AHEAD, f)))

    def took_ahead(self, fut: Any) -> None:
        """The planner's answer, asked ahead: recorded, gated, and put first in the backlog."""
        inputs, t0 = self.ahead or ({}, time.perf_counter())
        self.ahead = None
        self.rt.timings["propose"].append(time.perf_counter() - t0)
        try:
            proposals = fut.result()
        except Exception as exc:  # noqa: BLE001 - the planner failed: ask as before, at dispatch
            log.warning("campaign %s: asking the planner ahead failed (%s: %s); it is asked when a station "
                        "is free instead", self.spec.name, type(exc).__name__, exc)
            self._ahead_on = False
            return
        if self.rt.stop_requested.is_set():
            return  # stopping: nothing new is recorded
        self._take(proposals, inputs, ahead=True)

    def record(self, runner: InstrumentRunner, trial_id: int, fut: Any) -> None:
        """Write a finished trial's outcome to the ledger and free its station."""
        t_rec = time.perf_counter()
        try:
            outcome: TrialOutcome = fut.result()
        except Exception as exc:  # the task itself broke: still a recorded failure, never lost
            outcome = TrialOutcome(trial_id, "failed", reason=f"trial task failed: {type(exc).__name__}: {exc}")
        if self.n_steps > 1 and self._step_done(runner, trial_id, outcome):
            return  # the trial goes on to its next step
        if runner.instrument.name not in self.out:  # a station out of rotation is given no more trials
            self._pool(runner.instrument.name).append(runner)
        self.in_flight.pop(trial_id, None)
        self.station.pop(trial_id, None)
        number = self.numbers.pop(trial_id)
        if trial_id in self.detached:  # a person still has it: it stays running
            self.detached.discard(trial_id)
            return
        self.rt.timings["instrument"].append(outcome.seconds)
        if trial_id in self.abandoning:
            reason = self.abandoning.pop(trial_id)
            self.ledger.transition(trial_id, "abandoned", "operator", f"{reason} (its run was aborted)")
            self.rt.observer.trial_changed(self.rt, number, "abandoned", reason)
        elif outcome.state == "completed":
            self.ledger.complete(trial_id, outcome.values, outcome.run_uid or "", units=outcome.units)
            self.consecutive_failures = 0
            self.rt.observer.trial_changed(self.rt, number, "completed", _fmt(outcome.values))
            self._station_result(runner.instrument.name, failed=False)
        elif outcome.state == "abandoned":  # an interlock kept it from being measured
            self.ledger.transition(trial_id, "abandoned", "system", outcome.reason)
            self.rt.observer.trial_changed(self.rt, number, "abandoned", outcome.reason)
        else:
            self.ledger.transition(trial_id, "failed", "system", outcome.reason)
            self.consecutive_failures += 1
            self.rt.observer.trial_changed(self.rt, number, "failed", outcome.reason)
            self._station_result(runner.instrument.name, failed=True)
        self.rt.timings["overhead"].append(time.perf_counter() - t_rec)

    def stop_reason(self) -> tuple[str, str] | None:
        """Why the campaign must stop dispatching, or ``None`` to go on."""
        budget = self.spec.budget
        if self.rt.stop_requested.is_set():
            return "stopped", self.stop_text or "stopped by the operator"
        if self.consecutive_failures >= budget.max_consecutive_failures:
            return "failed", (f"{self.consecutive_failures} trials failed in a row; check the instrument, "
                              "then resume with 'labpilot run' again")
        if self.consecutive_vetoes >= MAX_CONSECUTIVE_VETOES:
            return "failed", (f"{self.consecutive_vetoes} proposals in a row were vetoed; the safety "
                              "envelope and the search space disagree")
        if self.lease.lost.is_set():
            return "failed", (f"the campaign's lock lapsed and {self.lease.lost_to} took it over; this "
                              "process stops dispatching")
        if budget.max_wall_time is not None and self.wall_seconds() >= budget.max_wall_time:
            return "finished", "wall-time budget spent (all sessions together)"
        return None

    def wall_seconds(self) -> float:
        """Wall time the campaign has run: earlier sessions (from the ledger) and this one."""
        return self.rt.wall_before + time.monotonic() - self.t_start

    def _reattach(self) -> None:
        """Put the manual trials a person was measuring back on their stations, to wait again."""
        for t in self.reattach:  # a station out of rotation too: the person's measurement is still theirs
            runner = next((r for r in self.rt.runners if r.instrument.name == t.instrument
                           and r not in self.station.values()), None)
            if runner is not None:
                if runner in self.free:
                    self.free.remove(runner)
                self.submit(runner, t.id, dict(t.parameters), reattach=True)
        self.reattach = []

    def _let_go_of_manual(self) -> None:
        """On stop: trials a person is measuring are not waited for; they stay running and are
        taken up again when the campaign resumes."""
        for tid, runner in list(self.station.items()):
            if is_manual(runner) and tid not in self.detached and tid not in self.abandoning:
                self.detached.add(tid)
                runner.abort("the campaign stopped; the trial waits for its result")

    def run(self) -> tuple[str, str]:
        self._reattach()
        while True:
            if INTERRUPT.is_set():
                raise KeyboardInterrupt  # a Ctrl-C that landed where Python drops it
            if self.applier.apply_pending():
                self._sync_waiting()
            self.expire_waiting()
            # what reached an instrument counts, abandoned trials too (a crash must not buy runs)
            room = self.spec.budget.max_trials - self.ledger.runs_done(self.cid) - len(self.in_flight)
            if self.n_steps > 1:
                self._advance_steps()
                room = min(room, self._step_room())
            stop = self.stop_reason()
            if stop is not None:
                self._let_go_of_manual()
            if not self.in_flight and (stop is not None or room <= 0 and self.n_steps == 1 or
                                       self.ledger.runs_done(self.cid) >= self.spec.budget.max_trials):
                return stop or ("finished", "budget of trials spent")
            if stop is None and not self.paused and self.free and room > 0:
                self.dispatch(room)
                if not self.in_flight and not self.waiting and self.ahead is None:
                    continue  # all vetoed: ask again at once
            if stop is None and not self.paused:
                self.ask_ahead()
            try:  # a short timeout keeps commands, stop requests and the wall-time budget responsive
                runner, trial_id, fut = self.done_q.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if trial_id == AHEAD:
                self.took_ahead(fut)
                continue
            self.record(runner, trial_id, fut)

    def interrupt(self, reason: str) -> None:
        """Abort every run in flight and record those trials as abandoned by the operator (a
        person's measurement excepted: it stays running, to be told when the campaign resumes)."""
        for runner in self.rt.runners:
            if runner.RE.state != "idle":
                runner.abort(reason)  # never blocks, even when a device call has the RunEngine stuck
        for trial_id in list(self.in_flight):
            if trial_id in self.station and is_manual(self.station[trial_id]):
                continue
            self.ledger.transition(trial_id, "abandoned", "operator", reason)


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


def run_campaign(runtime: CampaignRuntime) -> CampaignResult:
    """Run the campaign flow with a thread pool wide enough for every instrument at once."""
    runner = ThreadPoolTaskRunner(max_workers=max(2, len(runtime.runners) + 1))
    return campaign_flow.with_options(task_runner=runner, flow_run_name=runtime.spec.name)(runtime)
