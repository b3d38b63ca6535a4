"""Replay a campaign's decisions from its ledger: every recorded proposal asked again of a fresh planner.

A proposal records what its planner was given (``ProposalRow.inputs``: the
history and the running trials by trial number, the trial whose
``model_state`` the ask started from, how many proposals were asked for, and
whether a surrogate trainer served the planner), the state it leaves for the
next ask, and the model version it used (whose checkpoint is under the
campaign directory). A fresh planner built from the recorded campaign file and
given exactly that must propose exactly the same point: this is the promise
"same ledger, same decisions", and :func:`replay_campaign` checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.ledger import Ledger, history_item


@dataclass(frozen=True)
class ReplayedProposal:
    """One recorded proposal and what a fresh planner proposed from the same inputs."""

    trial: int
    recorded: dict[str, Any]
    replayed: dict[str, Any]
    recorded_version: str | None
    replayed_version: str | None

    @property
    def matches(self) -> bool:
        return self.recorded == self.replayed and self.recorded_version == self.replayed_version


def replay_campaign(ledger: Ledger, campaign_id: int) -> list[ReplayedProposal]:
    """Ask a fresh planner again for every proposal of the campaign that recorded its inputs.

    Returns one :class:`ReplayedProposal` per such trial, in trial order. Trials proposed by
    hand or by a labpilot that did not record inputs are skipped.
    """
    from orchestrator.learning import FixedModels, recorded_version
    from orchestrator.spec import parse_campaign
    from planners import make_planner

    campaign = ledger.campaign(campaign_id)
    spec = parse_campaign(campaign.spec)
    problem = spec.problem()
    trials = ledger.trials(campaign_id)
    by_number = {t.number: t for t in trials}
    states = {t.number: t.proposal.model_state for t in trials if t.proposal is not None}

    out: list[ReplayedProposal] = []
    asked: dict[tuple, list] = {}  # one ask per recorded batch
    for t in trials:
        inputs = t.proposal.inputs if t.proposal is not None else None
        if not inputs:
            continue
        label = t.proposal.model_version
        key = (tuple(inputs["history"]), tuple(inputs["pending"]), inputs.get("state_from"), inputs["n"], label)
        if key not in asked:
            planner = make_planner(spec.planner.name, problem, spec.seed, spec.planner.options)
            if inputs.get("trainer"):
                planner.surrogate_source = FixedModels(recorded_version(ledger, campaign_id, label))
            state_from = inputs.get("state_from")
            asked[key] = planner.ask(inputs["n"], [history_item(by_number[k]) for k in inputs["history"]],
                                     inputs.get("pending_points")
                                     or [dict(by_number[k].parameters) for k in inputs["pending"]],
                                     state=states.get(state_from) if state_from is not None else None)
        again = asked[key][inputs["index"]]
        proposed = t.proposal.parameters or t.parameters  # as proposed, before an operator's edit
        out.append(ReplayedProposal(t.number, dict(proposed), _plain(again.parameters), label,
                                    again.model_version))
    return out


def _plain(parameters: dict[str, Any]) -> dict[str, Any]:
    """Parameters as the ledger stores them (plain JSON values)."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in parameters.items()}
