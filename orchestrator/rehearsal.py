"""Rehearsing a user's own campaign: the simulated problem an instrument's ``simulator:``,
``dataset:`` or ``emulator:`` block stands for, its checks, and its known optimum.

Two ways to rehearse a campaign under its own parameter and outcome names before hardware:

- ``simulator: {problem: hartmann6, map: {temperature: x1, ...}, outcomes: {yield: y}}``: a
  test function mapped onto the campaign's parameters (``simulators.rehearsal``);
- ``emulator: {table: past.csv}`` or ``emulator: {ledger: runs/last-week}``: a model from
  ``planners.surrogates`` (``model: gp``, an :class:`ExactGP`, or ``ensemble``, a
  :class:`DeepEnsemble`) fitted once, when the campaign starts, to the table's rows or to the
  past campaign's completed trials, and sampled with its noise (``simulators.emulator``).

The fit is seeded with the campaign's seed and kept for the process (same data, same seed,
same model), so the stations of one instrument share it and a rerun refits nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from orchestrator.spec import EmulatorSpec, InstrumentSpec, MappedSimulator, SpecIssue
from simulators.problems import ProblemError, SimProblem, load_problem

if TYPE_CHECKING:
    from orchestrator.spec import CampaignSpec, _Fields

log = logging.getLogger("labpilot")

#: DeepEnsemble settings for an emulator: fewer steps than a planner's surrogate (it is fitted
#: once, on data that do not change) keep a fit on a few hundred rows to a few seconds on a CPU.
ENSEMBLE_OPTIONS = {"members": 5, "hidden": (32, 32), "max_steps": 400, "patience_steps": 100, "eval_every": 50}

_FITTED: dict[str, Any] = {}
_FIT_LOCK = threading.Lock()


# ---- checking a campaign file ----------------------------------------------------------
def check_rehearsal(inst: InstrumentSpec, where: str, f: _Fields, needed: list[str],
                    base_dir: Path | None) -> tuple[list[SpecIssue], list[str] | None]:
    """The problems with ``inst``'s mapped ``simulator:`` or ``emulator:`` block, and the outcomes it
    measures (``None`` when that cannot be known for the problems found)."""
    if inst.emulator is not None:
        return _check_emulator(inst, where, f, needed, base_dir)
    sim = inst.simulator
    assert isinstance(sim, MappedSimulator)
    try:
        base = load_problem(sim.problem)
    except ProblemError as exc:
        return [SpecIssue(f"{where}.simulator.problem", str(exc))], None
    valid = [n for n, p in zip(f.parameter_names or [], f.parameters, strict=False) if p is not None]
    shadowed = [n for n in f.parameter_names or [] if n is not None and n not in valid]  # reported already
    from simulators.rehearsal import check_mapping

    issues = [SpecIssue(f"{where}.simulator.{w}", m)
              for w, m in check_mapping(base, [p for p in f.parameters if p is not None], sim.map, sim.fixed,
                                        sim.outcomes)
              if w.removeprefix("map.") not in shadowed]
    produced = list(sim.outcomes or base.outcomes)
    if inst.outcomes:
        unknown = [o for o in inst.outcomes if o not in produced]
        if unknown:
            issues.append(SpecIssue(f"{where}.outcomes", f"{unknown} are not measured: the simulator's "
                                    f"'outcomes' map gives {produced}; add them there"))
        produced = list(inst.outcomes)
    return issues, produced


def _check_emulator(inst: InstrumentSpec, where: str, f: _Fields, needed: list[str],
                    base_dir: Path | None) -> tuple[list[SpecIssue], list[str] | None]:
    emu = inst.emulator
    assert emu is not None
    key = "table" if emu.table else "ledger"
    _resolve_paths(emu, base_dir)
    outcomes = list(inst.outcomes or needed)
    parameters = [p for p in f.parameters if p is not None]
    try:
        frame = emulator_frame(emu, [p.name for p in parameters] + outcomes)
        if len(parameters) == len(f.parameters):  # else a bad parameter is reported: no rows to judge
            from simulators.emulator import usable_rows

            usable_rows(frame, parameters, outcomes, _source(emu))
    except ProblemError as exc:
        return [SpecIssue(f"{where}.emulator.{key}", str(exc))], None
    return [], outcomes


def _resolve_paths(emu: EmulatorSpec, base_dir: Path | None) -> None:
    """A table or ledger directory written relative to the campaign file, as a user reads it."""
    for attr in ("table", "ledger"):
        value = getattr(emu, attr)
        if value and "://" not in value and base_dir is not None and not Path(value).is_absolute() \
                and (base_dir / value).exists():
            setattr(emu, attr, str(base_dir / value))


def _source(emu: EmulatorSpec) -> str:
    return emu.table if emu.table else f"{emu.ledger}" + (f" (campaign {emu.campaign!r})" if emu.campaign else "")


# ---- the rows an emulator learns from ---------------------------------------------------
def emulator_frame(emu: EmulatorSpec, columns: list[str]) -> pd.DataFrame:
    """The table's rows, or the past campaign's completed trials (parameters and outcomes as
    columns), checked to hold ``columns``; ``ProblemError`` saying what to fix otherwise."""
    from simulators.emulator import read_table

    if emu.table:
        return read_table(emu.table, columns)
    assert emu.ledger is not None
    url = _ledger_url(emu.ledger)
    from orchestrator.ledger import Ledger

    ledger = Ledger(url)
    try:
        if emu.campaign:
            try:
                campaign = ledger.campaign_by_name(emu.campaign)
            except LookupError as exc:
                raise ProblemError(f"{exc}; name one of those in 'campaign'") from None
        else:
            held = ledger.campaigns()
            if len(held) != 1:
                raise ProblemError(f"the ledger {emu.ledger!r} holds {len(held)} campaigns"
                                   + (f" ({', '.join(c.name for c in held)}); choose one with 'campaign: NAME'"
                                      if held else "; run one first, or give another ledger"))
            campaign = held[0]
        rows = [{**t.parameters, **t.observation.values}
                for t in ledger.trials(campaign.id, states=("completed",)) if t.observation is not None]
    finally:
        ledger.close()
    frame = pd.DataFrame(rows)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ProblemError(f"the completed trials of campaign {campaign.name!r} in {emu.ledger!r} have no "
                           f"{missing} (they have {list(frame.columns)}); an emulator learns the "
                           "campaign's parameters and outcomes from a campaign that had them")
    return frame


def _ledger_url(where: str) -> str:
    """The ledger of a campaign directory (its ledger.json note of a store URL, else its
    ledger.sqlite), or ``where`` itself when it is a URL; never a new, empty ledger."""
    from orchestrator.ledger import sqlite_url

    if "://" in where:
        if where.startswith("sqlite:///") and not Path(where.removeprefix("sqlite:///").split("?")[0]).is_file():
            raise ProblemError(f"no SQLite ledger at {where!r}; give the URL of an existing ledger")
        return where
    d = Path(where)
    pointer = d / "ledger.json"  # written by 'labpilot run' for a campaign whose store is elsewhere
    if pointer.is_file():
        try:
            return str(json.loads(pointer.read_text())["url"])
        except (ValueError, KeyError, TypeError):
            raise ProblemError(f"{pointer} is not the note 'labpilot run' writes; give the store URL") from None
    if not (d / "ledger.sqlite").is_file():
        raise ProblemError(f"{where!r} holds no ledger.sqlite; give the directory a past 'labpilot run' "
                           "wrote (its --output, e.g. runs/NAME) or the ledger's store URL")
    return sqlite_url(d)


def _fitted_model(emu: EmulatorSpec, spec: CampaignSpec, outcomes: list[str]) -> Any:
    """The surrogate fitted to the emulator's rows, once per data, campaign space and seed."""
    import torch

    from planners.space import SearchSpace
    from simulators.emulator import usable_rows

    parameters = list(spec.parameters)
    frame = emulator_frame(emu, [p.name for p in parameters] + outcomes)
    digest = hashlib.sha256(json.dumps([emu.model_dump(mode="json"), [p.model_dump(mode="json") for p in parameters],
                                        outcomes, spec.seed], sort_keys=True, default=str).encode())
    digest.update(pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy().tobytes())
    key = digest.hexdigest()
    with _FIT_LOCK:
        if key in _FITTED:
            return _FITTED[key]
        points, Y, warnings = usable_rows(frame, parameters, outcomes, _source(emu))
        for w in warnings:
            log.warning("emulator %s", w)
        X = SearchSpace(parameters=parameters).encode(points)
        Yt = torch.as_tensor(Y, dtype=torch.double)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            if emu.model == "gp":
                from planners.surrogates import ExactGP

                model = ExactGP()
            else:
                from planners.surrogates import DeepEnsemble

                model = DeepEnsemble(seed=spec.seed, **ENSEMBLE_OPTIONS)
            metrics = model.fit(X, Yt)
        log.info("emulator %s: %s fitted to %d rows in %.2f s", _source(emu), emu.model, len(points),
                 metrics.get("seconds", float("nan")))
        _FITTED[key] = model
        return model


# ---- the problem an instrument measures -------------------------------------------------
def simulated_problem(inst: InstrumentSpec, spec: CampaignSpec | None, seed: int = 0) -> SimProblem:
    """The physics of a simulated instrument of ``spec``: a named problem or table, a test
    function mapped onto the campaign, or an emulator (whose draws are seeded with ``seed``).
    Only a named problem or table can do without the campaign (``spec=None``)."""
    if spec is None and (isinstance(inst.simulator, MappedSimulator) or inst.emulator is not None):
        raise ValueError(f"instrument {inst.name!r}: a mapped simulator or an emulator reads the campaign's "
                         "parameters; pass the campaign")
    if isinstance(inst.simulator, MappedSimulator):
        from simulators.rehearsal import map_problem

        sim = inst.simulator
        return map_problem(load_problem(sim.problem), list(spec.parameters), list(spec.objectives), sim.map,
                           sim.fixed, sim.outcomes, list(spec.constraints))
    if inst.emulator is not None:
        from simulators.emulator import emulated_problem

        outcomes = list(inst.outcomes or spec.outcome_names)
        model = _fitted_model(inst.emulator, spec, outcomes)
        goals = {o.name: o for o in spec.objectives}
        return emulated_problem(model, list(spec.parameters), outcomes, noise=inst.emulator.noise, seed=seed,
                                objectives=[goals[o] for o in outcomes if o in goals],
                                name="emulator", source=_source(inst.emulator))
    return load_problem(inst.simulator, inst.dataset)  # type: ignore[arg-type]


def known_optimum(spec: CampaignSpec) -> dict[str, float]:
    """The known optimum (and reference point, ``ref_<outcome>``) of the campaign's first
    instrument under the campaign's names; ``{}`` where none is known (hardware, a person, an
    emulator, a mapping that cannot reach it)."""
    inst = spec.instruments[0]
    if inst.kind not in ("simulator", "dataset"):
        return {}
    return simulated_problem(inst, spec).optimum
