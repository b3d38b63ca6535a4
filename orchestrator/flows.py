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
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from instruments import Instrument, InstrumentRunner, InstrumentTimeout, MeasurementError
from orchestrator.ledger import Ledger
from orchestrator.report import Best, best_so_far
from orchestrator.safety import veto_reason
from orchestrator.spec import CampaignSpec, InstrumentSpec
from planners import Planner, Proposal, make_planner

log = logging.getLogger("labpilot")

MAX_CONSECUTIVE_VETOES = 25


class CampaignObserver:
    """Receives the campaign's progress (the terminal display, the console). All no-ops here."""

    def started(self, runtime: CampaignRuntime) -> None: ...
    def trial_changed(self, runtime: CampaignRuntime, number: int, state: str, info: str = "") -> None: ...
    def finished(self, runtime: CampaignRuntime, result: CampaignResult) -> None: ...


@dataclass
class TrialOutcome:
    """What a run-trial task hands back to the flow."""

    trial_id: int
    state: str  # "completed" or "failed"
    values: dict[str, float] = field(default_factory=dict)
    run_uid: str | None = None
    reason: str = ""
    seconds: float = 0.0


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


def build_runners(spec: CampaignSpec, on_document=None) -> list[InstrumentRunner]:
    """One runner (one RunEngine) per instrument station; ``concurrency: k`` makes k stations."""
    runners = []
    for inst in spec.instruments:
        for lane in range(inst.concurrency):
            name = inst.name if inst.concurrency == 1 else f"{inst.name}-{lane + 1}"
            device, outcomes = _make_device(inst, name, seed=spec.seed * 1000 + len(runners))
            runners.append(InstrumentRunner(
                Instrument(name=name, device=device, outcomes=outcomes, timeout=inst.timeout),
                on_document=on_document,
            ))
    return runners


def _make_device(inst: InstrumentSpec, name: str, seed: int) -> tuple[Any, list[str]]:
    if inst.device:
        import importlib

        module, _, attr = inst.device.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        return factory(name=name.replace("-", "_")), list(inst.outcomes or [])
    from simulators import Behaviour, load_problem, make_simulated_device

    problem = load_problem(inst.simulator, inst.dataset)
    behaviour = Behaviour(latency=inst.latency, noise=inst.noise, drift=inst.drift,
                          failure_rate=inst.failure_rate, hang_rate=inst.hang_rate, seed=seed)
    device = make_simulated_device(problem, name.replace("-", "_"), behaviour)
    return device, list(inst.outcomes or problem.outcomes)


@task(name="propose", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def propose(planner: Planner, n: int, history: list, pending: list[dict[str, Any]]) -> list[Proposal]:
    """Ask the planner for ``n`` proposals (retried: a numerical hiccup should not end a night's run)."""
    return planner.ask(n, history, pending)


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
    except InstrumentTimeout as exc:
        return TrialOutcome(trial_id, "failed", reason=str(exc), seconds=time.perf_counter() - t0)
    except MeasurementError as exc:
        return TrialOutcome(trial_id, "failed", reason=f"measurement failed: {exc}",
                            seconds=time.perf_counter() - t0)
    return TrialOutcome(trial_id, "completed", values=obs.values, run_uid=obs.run_uid,
                        seconds=time.perf_counter() - t0)


class CampaignRuntime:
    """Everything one campaign run holds: spec, ledger, planner, instrument runners."""

    def __init__(self, spec: CampaignSpec, output_dir: str | Path,
                 observer: CampaignObserver | None = None, on_document=None) -> None:
        self.spec = spec
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        from orchestrator.settings import Settings

        self.ledger = Ledger.for_directory(self.output_dir, spec.store or Settings().ledger_url)
        self.campaign_id, self.resumed = self.ledger.open_campaign(
            spec.name, spec.model_dump(mode="json"), spec.seed)
        self.problem = spec.problem()
        self.planner = make_planner(spec.planner.name, self.problem, spec.seed, spec.planner.options)
        self.runners = build_runners(spec, on_document)
        self.observer = observer or CampaignObserver()
        self.timings: dict[str, list[float]] = {"propose": [], "instrument": [], "overhead": []}
        self.stop_requested = threading.Event()

    def best(self) -> Best:
        ref = None
        if len(self.spec.objectives) > 1:
            ref = self._reference_point()
        return best_so_far(self.ledger.history(self.campaign_id), self.spec.objectives,
                           self.spec.outcome_constraints, ref)

    def _reference_point(self) -> list[float] | None:
        # A simulator with a published reference point gives comparable hypervolumes.
        from simulators import load_problem

        inst = self.spec.instruments[0]
        if inst.device:
            return None
        sim = load_problem(inst.simulator, inst.dataset)
        refs = [sim.optimum.get(f"ref_{o.name}") for o in self.spec.objectives]
        return None if any(r is None for r in refs) else refs  # type: ignore[return-value]

    def recover(self) -> None:
        """Bring a resumed campaign to a consistent state before dispatching anything.

        A trial left ``running`` by a crash may have run on the hardware: it is
        abandoned (never rerun). ``proposed`` and ``approved`` trials never
        reached an instrument and are dispatched as they are.
        """
        for t in self.ledger.trials(self.campaign_id, ("running",)):
            self.ledger.transition(t.id, "abandoned", "system",
                                   "the campaign stopped while this trial ran; not rerun, since it may "
                                   "have used material; re-queue it by hand if it did not")


def _runs_done(counts: dict[str, int]) -> int:
    return counts["completed"] + counts["failed"]


@flow(name="labpilot-campaign", persist_result=False, validate_parameters=False, log_prints=False)
def campaign_flow(runtime: CampaignRuntime) -> CampaignResult:
    """The closed loop for one campaign, until its budget is spent or it is stopped."""
    spec, ledger, cid = runtime.spec, runtime.ledger, runtime.campaign_id
    budget = spec.budget
    t_start = time.monotonic()
    runtime.recover()
    runtime.observer.started(runtime)
    done_q: queue.Queue[tuple[InstrumentRunner, int, Any]] = queue.Queue()
    free = list(runtime.runners)
    in_flight: dict[int, dict[str, Any]] = {}  # trial id -> parameters
    consecutive_failures = 0
    consecutive_vetoes = 0
    status, reason = "finished", "budget of trials spent"
    backlog = [t.id for t in ledger.trials(cid, ("proposed", "approved"))]  # from a resumed run

    def submit(runner: InstrumentRunner, trial_id: int) -> None:
        trial = next(t for t in ledger.trials(cid, ("approved",)) if t.id == trial_id)
        ledger.transition(trial_id, "running", "system", f"started on {runner.instrument.name}",
                          instrument=runner.instrument.name)
        runtime.observer.trial_changed(runtime, trial.number, "running", runner.instrument.name)
        in_flight[trial_id] = trial.parameters
        md = {"campaign": spec.name, "campaign_id": cid, "trial_id": trial_id,
              "trial_number": trial.number, "instrument": runner.instrument.name,
              "parameters": trial.parameters}
        fut = run_trial.submit(runner, trial_id, trial.parameters, md)
        fut.add_done_callback(lambda f, r=runner, t=trial_id: done_q.put((r, t, f)))

    def gate(trial_id: int, actor_reason: str) -> bool:
        """Safety veto or approval; True when approved."""
        trial = next(t for t in ledger.trials(cid) if t.id == trial_id)
        if trial.state == "approved":
            return True
        why = veto_reason(trial.parameters, runtime.problem.space, spec.safety)
        if why:
            ledger.transition(trial_id, "vetoed", "system", why)
            runtime.observer.trial_changed(runtime, trial.number, "vetoed", why)
            return False
        ledger.transition(trial_id, "approved", "system", actor_reason)
        return True

    while True:
        counts = ledger.counts(cid)
        elapsed = time.monotonic() - t_start
        room = budget.max_trials - _runs_done(counts) - len(in_flight)
        stopping = (
            runtime.stop_requested.is_set()
            or (budget.max_wall_time is not None and elapsed >= budget.max_wall_time)
            or consecutive_failures >= budget.max_consecutive_failures
            or consecutive_vetoes >= MAX_CONSECUTIVE_VETOES
        )
        if stopping and not in_flight:
            if runtime.stop_requested.is_set():
                status, reason = "stopped", "stopped by the operator"
            elif consecutive_failures >= budget.max_consecutive_failures:
                status, reason = "failed", (f"{consecutive_failures} trials failed in a row; "
                                            "check the instrument, then resume with 'labpilot run' again")
            elif consecutive_vetoes >= MAX_CONSECUTIVE_VETOES:
                status, reason = "failed", (f"{consecutive_vetoes} proposals in a row were vetoed; "
                                            "the safety envelope and the search space disagree")
            else:
                status, reason = "finished", "wall-time budget spent"
            break
        if room <= 0 and not in_flight:
            break
        t_iter = time.perf_counter()
        planner_seconds = 0.0
        if not stopping and free and room > 0:
            while backlog and free and room > 0:
                tid = backlog.pop(0)
                if gate(tid, "resumed: passed the safety envelope"):
                    submit(free.pop(0), tid)
                    room -= 1
            n = min(len(free), room)
            if n > 0:
                history = ledger.history(cid)
                t0 = time.perf_counter()
                proposals = propose(runtime.planner, n, history, list(in_flight.values()))
                planner_seconds = time.perf_counter() - t0
                runtime.timings["propose"].append(planner_seconds)
                for p in proposals:
                    tid = ledger.propose(cid, p)
                    runtime.observer.trial_changed(runtime, -1, "proposed")
                    if gate(tid, "passed the safety envelope (approval policy: auto)"):
                        consecutive_vetoes = 0
                        submit(free.pop(0), tid)
                    else:
                        consecutive_vetoes += 1
            # Orchestration alone: ledger writes, safety gate, task submission (not the planner).
            runtime.timings["overhead"].append(time.perf_counter() - t_iter - planner_seconds)
            if not in_flight:
                continue
        # Wait for the next trial to finish (a short timeout keeps stop requests responsive).
        try:
            runner, tid, fut = done_q.get(timeout=0.5)
        except queue.Empty:
            continue
        t_rec = time.perf_counter()
        try:
            outcome: TrialOutcome = fut.result()
        except Exception as exc:  # the task itself broke or hit its backstop timeout
            outcome = TrialOutcome(tid, "failed", reason=f"trial task failed: {type(exc).__name__}: {exc}")
        free.append(runner)
        in_flight.pop(outcome.trial_id, None)
        runtime.timings["instrument"].append(outcome.seconds)
        number = next(t.number for t in ledger.trials(cid) if t.id == outcome.trial_id)
        if outcome.state == "completed":
            ledger.complete(outcome.trial_id, outcome.values, outcome.run_uid or "")
            consecutive_failures = 0
            runtime.observer.trial_changed(runtime, number, "completed", _fmt(outcome.values))
        else:
            ledger.transition(outcome.trial_id, "failed", "system", outcome.reason)
            consecutive_failures += 1
            runtime.observer.trial_changed(runtime, number, "failed", outcome.reason)
        runtime.timings["overhead"].append(time.perf_counter() - t_rec)

    ledger.finish_campaign(cid, status, reason)
    result = CampaignResult(cid, runtime.output_dir, status, reason, ledger.counts(cid), runtime.best(),
                            time.monotonic() - t_start, runtime.timings)
    runtime.observer.finished(runtime, result)
    return result


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


def run_campaign(runtime: CampaignRuntime) -> CampaignResult:
    """Run the campaign flow with a thread pool wide enough for every instrument at once."""
    runner = ThreadPoolTaskRunner(max_workers=max(2, len(runtime.runners) + 1))
    return campaign_flow.with_options(task_runner=runner, flow_run_name=runtime.spec.name)(runtime)
