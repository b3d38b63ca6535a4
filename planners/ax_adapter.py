"""Ax (ax-platform 1.x) behind the ``Planner`` interface: the benchmark's off-the-shelf baseline.

Ax's ``Client`` (``ax.api``) with Ax's own default generation strategy
(the centre of the space, then Sobol, then its modular BoTorch GP; Ax
decides when to move on). Nothing is tuned here: the point of this planner
is to be what a user gets from Ax out of the box.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

from planners.base import HistoryItem, Planner, Problem, Proposal, finite, row_key
from planners.baselines import design_space
from planners.space import CategoricalParameter, FloatParameter, IntParameter

#: Ax's ``Client`` seeds numpy, which takes seeds below 2**32.
_SEED_MODULUS = 2**32 - 1


class _WarningsAndAbove(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class _NoShortBatchNotice(logging.Filter):
    """Drop Ax's warning that it made fewer trials than asked: the adapter asks again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "trials requested but only" not in record.getMessage()


logging.getLogger("ax.api.client").addFilter(_NoShortBatchNotice())

# Ax logs an INFO line while it is being imported (its SQL storage); a filter put on that
# logger before the import drops it (Ax resets the logger's level on import, not its filters).
logging.getLogger("ax.storage.sqa_store.with_db_settings_base").addFilter(_WarningsAndAbove())


def quiet_ax_loggers(level: int = logging.WARNING) -> None:
    """Set every ``ax`` logger to ``level``: Ax logs an INFO line for each call it serves.

    Ax gives each of its module loggers its own level (INFO) when the module is
    imported, so setting the ``ax`` root logger alone is not enough; this is
    called again on each ``ask`` to catch the modules Ax imports lazily.
    """
    for name in list(logging.root.manager.loggerDict):
        if name == "ax" or name.startswith("ax."):
            logging.getLogger(name).setLevel(level)


class AxPlanner(Planner):
    """Ax's ``Client`` with Ax's default generation strategy.

    Each ``ask`` is pure with respect to storage: it builds a fresh ``Client``
    (``random_seed`` = the step seed, ``Planner.step_seed``, which is also the
    ``seed`` of the proposals), declares the search space and goals, replays
    the history as trials (completed with their outcomes, or failed), attaches
    the pending points as running trials (so Ax treats them as pending), and
    asks ``get_next_trials`` for ``n`` more.

    Mapping to Ax: floats -> ``RangeParameterConfig`` (``scaling="log"`` for
    log-scaled ones), ints -> integer ranges, categoricals -> unordered
    ``ChoiceParameterConfig`` of strings (mapped back to the exact choices of
    the space); linear inequality constraints -> Ax parameter-constraint
    strings; objectives -> ``"y"`` / ``"-y"`` / ``"a, -b"`` (multi-objective);
    outcome constraints -> ``"purity >= 0.9"``. Ax parses these strings with
    sympy, which rejects names such as ``yield``, ``lambda``, ``E`` or ``N``, so
    the adapter gives Ax its own names (``p0, p1, ...`` for parameters,
    ``m0, m1, ...`` for outcomes) and maps back.

    Not supported (``ValueError`` when the planner is built): equality
    constraints (``==``, e.g. fractions that must add to a total; Ax's
    parameter constraints are inequalities only) and the ``target`` goal.
    Use planner ``bo`` for either. In pool mode the constraints are left out
    of Ax's space (every row satisfies them), so a fractions pool works.

    Pool mode (a table that is the whole world): Ax has no pool mode. The
    adapter asks Ax for ``n`` points in the continuous space spanned by the
    pool's parameters, then snaps each, in order, to the nearest untried pool
    row not already chosen. Distance is Euclidean over the parameters, each
    float/int scaled to ``[0, 1]`` by its bounds (log-scaled floats on the log
    scale); a categorical adds 0 when it matches and 1 when it does not.

    Ax makes each batch from one node of its strategy, so a batch that spans
    the switch from Sobol to the model comes back short; the adapter asks
    again for the rest. Ax will not propose more initialization (Sobol) trials
    than its budget while they all still await data; a call that needs more
    raises ``RuntimeError`` saying so (wait for results, or ask for fewer).

    Reproducible: the same seed, history and pending points give the same
    proposals, in the Sobol and the model phase alike (both follow the
    ``Client``'s ``random_seed``; checked with ax-platform 1.3.1 on the CPU).
    As each ``ask`` has its own seed, the Sobol points of successive asks come
    from differently scrambled sequences, where one long-lived ``Client``
    would continue a single sequence. A replayed history also makes the fresh
    strategy catch up at once (``current_generator_run_limit``) with the node
    a long-lived ``Client`` would be at. Proposals name that node in
    ``model_version`` (``ax-CenterOfSearchSpace``, ``ax-Sobol``, ``ax-MBM``);
    when the node's model could not make a new point and Ax fell back to
    Sobol (Ax logs ``switching to fallback model``; frequent on categorical
    spaces, where the model keeps proposing points already tried), the
    fallback's key follows: ``ax-MBM/Fallback_Sobol`` (``labpilot bench``
    counts these per row).

    Options (``planner.options`` in a campaign file):
      - ``initial_trials`` (int or null, default null): the number of
        initialization trials, passed to Ax's
        ``configure_generation_strategy(initialization_budget=...)``; null keeps
        Ax's default (5, counting the centre point).
    """

    name = "ax"

    def __init__(self, problem: Problem, seed: int = 0, initial_trials: int | None = None) -> None:
        super().__init__(problem, seed)
        if initial_trials is not None:
            if isinstance(initial_trials, bool) or int(initial_trials) != initial_trials or initial_trials < 1:
                raise ValueError(f"initial_trials must be a whole number of at least 1 or null (got {initial_trials!r})")
            initial_trials = int(initial_trials)
        self.initial_trials = initial_trials
        self._check_supported()
        space = problem.space
        self._param_alias = {p.name: f"p{i}" for i, p in enumerate(space.parameters)}
        self._metric_alias = {m: f"m{i}" for i, m in enumerate(problem.outcome_names)}

    # ---- what Ax can express ----------------------------------------------
    def _check_supported(self) -> None:
        # In pool mode the constraints are not Ax's to keep: every pool row satisfies them.
        for c in design_space(self.problem).constraints:
            if c.op == "==":
                raise ValueError(
                    f"the Ax adapter does not support the equality constraint '{c}': Ax's "
                    "parameter constraints are inequalities (<=, >=) only, so fractions that "
                    "must add up to a total cannot be expressed; use planner 'bo', which "
                    "handles equality constraints"
                )
        for o in self.problem.objectives:
            if o.goal == "target":
                raise ValueError(
                    f"objective {o.name!r} has goal 'target', which the Ax adapter does not "
                    "support (Ax objectives are maximize or minimize); use planner 'bo', or "
                    "maximize/minimize a measured distance to the target"
                )
        if not self.problem.objectives:
            raise ValueError("the Ax adapter needs at least one objective")

    def _parameter_configs(self) -> list[Any]:
        from ax.api.configs import ChoiceParameterConfig, RangeParameterConfig

        configs: list[Any] = []
        for p in self.problem.space.parameters:
            alias = self._param_alias[p.name]
            if isinstance(p, FloatParameter):
                configs.append(RangeParameterConfig(
                    name=alias, bounds=(float(p.lower), float(p.upper)), parameter_type="float",
                    scaling="log" if p.log_scale else "linear",
                ))
            elif isinstance(p, IntParameter):
                configs.append(RangeParameterConfig(
                    name=alias, bounds=(int(p.lower), int(p.upper)), parameter_type="int",
                ))
            else:
                configs.append(ChoiceParameterConfig(
                    name=alias, values=[str(c) for c in p.choices], parameter_type="str",
                    is_ordered=False,
                ))
        return configs

    def _parameter_constraints(self) -> list[str]:
        out = []
        for c in design_space(self.problem).constraints:
            lhs = " + ".join(f"{float(a)!r} * {self._param_alias[n]}" for n, a in c.coefficients.items())
            out.append(f"{lhs} {c.op} {float(c.rhs)!r}")
        return out

    def _objective_string(self) -> str:
        terms = [
            ("-" if o.goal == "minimize" else "") + self._metric_alias[o.name]
            for o in self.problem.objectives
        ]
        return ", ".join(terms)

    def _outcome_constraint_strings(self) -> list[str]:
        return [
            f"{self._metric_alias[c.name]} {c.op} {float(c.bound)!r}"
            for c in self.problem.outcome_constraints
        ]

    # ---- points in and out of Ax ------------------------------------------
    def _to_ax(self, point: dict[str, Any]) -> dict[str, Any]:
        """A point of ours -> an Ax parameterization (Ax's names and types)."""
        out: dict[str, Any] = {}
        for p in self.problem.space.parameters:
            if p.name not in point:
                raise ValueError(f"point {point} lacks parameter {p.name!r}")
            v = point[p.name]
            if isinstance(p, FloatParameter):
                v = float(v)
            elif isinstance(p, IntParameter):
                v = int(round(float(v)))
            else:
                v = str(v)
            out[self._param_alias[p.name]] = v
        return out

    def _from_ax(self, params: dict[str, Any]) -> dict[str, Any]:
        """An Ax parameterization -> a legal point of ours (bounds, ints, exact choices)."""
        out: dict[str, Any] = {}
        for p in self.problem.space.parameters:
            v = params[self._param_alias[p.name]]
            if isinstance(p, FloatParameter):
                out[p.name] = min(max(float(v), p.lower), p.upper)
            elif isinstance(p, IntParameter):
                out[p.name] = int(min(max(int(round(float(v))), p.lower), p.upper))
            else:
                by_str = {str(c): c for c in p.choices}
                if str(v) not in by_str:
                    raise RuntimeError(f"Ax proposed {p.name}={v!r}, not one of {p.choices}")
                out[p.name] = by_str[str(v)]
        return out

    def _outcomes_to_ax(self, outcomes: dict[str, Any]) -> dict[str, float]:
        out = {}
        for name, alias in self._metric_alias.items():
            value = outcomes.get(name)
            if finite(value):
                out[alias] = float(value)
        return out

    # ---- the interface ---------------------------------------------------
    def _configured_client(self, seed: int) -> Any:
        """An Ax ``Client`` seeded ``seed`` with this problem's experiment and optimization declared."""
        from ax.api.client import Client

        client = Client(random_seed=seed)
        client.configure_experiment(
            parameters=self._parameter_configs(),
            parameter_constraints=self._parameter_constraints() or None,
            name="labpilot",
        )
        client.configure_optimization(
            objective=self._objective_string(),
            outcome_constraints=self._outcome_constraint_strings() or None,
        )
        return client

    def _tell_one(self, client: Any, index: int, item: HistoryItem) -> None:
        """Tell Ax how trial ``index`` ended: completed with its outcomes, abandoned (tried, no
        result: Ax must not propose it again either) or failed."""
        if item.state == "completed":
            client.complete_trial(trial_index=index, raw_data=self._outcomes_to_ax(item.outcomes) or None)
        elif item.state == "abandoned":
            client.mark_trial_abandoned(trial_index=index)
        else:
            client.mark_trial_failed(trial_index=index)

    def _client(self, seed: int, history: list[HistoryItem], pending: list[dict[str, Any]]) -> Any:
        """A fresh Ax ``Client`` with the experiment declared and ``history``/``pending`` attached."""
        client = self._configured_client(seed)
        # Ax's default strategy; with initial_trials=None exactly what the Client would choose.
        client.configure_generation_strategy(initialization_budget=self.initial_trials)
        for item in history:
            index = client.attach_trial(parameters=self._to_ax(item.parameters))
            self._tell_one(client, index, item)
        for point in pending:
            client.attach_trial(parameters=self._to_ax(point))  # left RUNNING: pending to Ax
        # A fresh strategy moves on at most one node per trial it generates, so on a
        # replayed history it would stay in Sobol for one more trial than the Client
        # that lived through the campaign. Let it catch up first: Ax's own public
        # ``current_generator_run_limit`` takes every transition whose criteria are met.
        client._generation_strategy.current_generator_run_limit()  # noqa: SLF001
        return client

    def ask(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]],
            state: dict[str, Any] | None = None) -> list[Proposal]:
        if n < 1:
            return []
        untried = self._untried(n, history, pending)
        seed = self.step_seed(history, pending) % _SEED_MODULUS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import ax.api.client  # noqa: F401 - Ax's modules first, then quiet their loggers

            quiet_ax_loggers()
            client = self._client(seed, history, pending)
            generated = self._generate(client, n)
        quiet_ax_loggers()
        return self._proposals(client, generated, untried, seed)

    def _untried(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]]) -> list[int] | None:
        """The untried pool rows (pool mode; at least ``n`` of them), else ``None``."""
        if self.problem.pool is None:
            return None
        untried = self.untried_pool(history, pending)
        if len(untried) < n:
            raise ValueError(f"the pool has {len(untried)} untried rows, fewer than the {n} asked for")
        return untried

    def _proposals(self, client: Any, generated: list[tuple[int, dict[str, Any]]], untried: list[int] | None,
                   seed: int) -> list[Proposal]:
        """Ax's generated trials as proposals (snapped to untried rows in pool mode)."""
        points = [self._from_ax(dict(params)) for _, params in generated]
        versions = [_model_version(client, index) for index, _ in generated]
        if untried is not None:
            rows = self._snap_to_pool(points, untried)
            points = [dict(self.problem.pool[i]) for i in rows]  # type: ignore[index]
        return [
            Proposal(parameters=p, planner=self.name, seed=seed, model_version=v)
            for p, v in zip(points, versions, strict=True)
        ]

    def _generate(self, client: Any, n: int) -> list[tuple[int, dict[str, Any]]]:
        """``n`` (trial index, parameters) from ``get_next_trials``, asking again if Ax gives fewer."""
        from ax.exceptions.core import DataRequiredError

        out: list[tuple[int, dict[str, Any]]] = []
        while len(out) < n:
            try:
                trials = client.get_next_trials(max_trials=n - len(out))
            except DataRequiredError as exc:
                raise RuntimeError(self._short_message(n, len(out), str(exc))) from exc
            if not trials:
                raise RuntimeError(self._short_message(n, len(out), "Ax generated no trial"))
            out.extend(sorted(trials.items()))
        return out

    def _short_message(self, n: int, got: int, why: str) -> str:
        return (
            f"Ax proposed {got} of the {n} trials asked for: {why} Ax's default strategy "
            "stops after its initialization trials until enough of them have results; "
            "wait for running trials to finish, ask for fewer at once, or raise the "
            "planner option 'initial_trials'"
        )

    def _snap_to_pool(self, points: list[dict[str, Any]], untried: list[int]) -> list[int]:
        """For each point in order, the nearest untried pool row not chosen yet."""
        pool = self.problem.pool
        assert pool is not None
        chosen: list[int] = []
        taken: set[int] = set()
        for point in points:
            best, best_d = None, math.inf
            for i in untried:
                if i in taken:
                    continue
                d = self._distance(point, pool[i])
                if d < best_d:
                    best, best_d = i, d
            assert best is not None
            chosen.append(best)
            taken.add(best)
        return chosen

    def _distance(self, a: dict[str, Any], b: dict[str, Any]) -> float:
        total = 0.0
        for p in self.problem.space.parameters:
            if isinstance(p, CategoricalParameter):
                total += 0.0 if str(a[p.name]) == str(b[p.name]) else 1.0
                continue
            if isinstance(p, FloatParameter) and p.log_scale:
                lo, hi = math.log(p.lower), math.log(p.upper)
                za = (math.log(max(float(a[p.name]), p.lower)) - lo) / (hi - lo)
                zb = (math.log(max(float(b[p.name]), p.lower)) - lo) / (hi - lo)
            else:
                za = (float(a[p.name]) - p.lower) / (p.upper - p.lower)
                zb = (float(b[p.name]) - p.lower) / (p.upper - p.lower)
            total += (za - zb) ** 2
        return math.sqrt(total)


def _model_version(client: Any, index: int) -> str | None:
    """``ax-NODE`` for the generation node that made trial ``index``; ``ax-NODE/KEY`` when the
    node fell back to another generator (Ax's ``Fallback_Sobol``) to make it."""
    trial = client._experiment.trials.get(index)  # noqa: SLF001 - only to name the node that proposed
    runs = getattr(trial, "generator_runs", None) or []
    if not runs:
        return None
    node = getattr(runs[0], "_generation_node_name", None)
    key = getattr(runs[0], "_generator_key", None) or ""
    if not node:
        return None
    return f"ax-{node}/{key}" if key.startswith("Fallback") else f"ax-{node}"


class AxNativePlanner(AxPlanner):
    """Ax's ``Client`` as its documentation runs it: one ``Client`` for the whole run.

    For the benchmark only (``labpilot bench --planners ax-native``), as the
    reference of what Ax does on its own: ``Client(random_seed=seed)``,
    ``configure_experiment`` and ``configure_optimization`` once, Ax's default
    generation strategy (chosen by the ``Client`` on the first
    ``get_next_trials``), its own initial design (the centre, then Sobol), and
    then ``get_next_trials`` / ``complete_trial`` on that same ``Client``.

    It is not a campaign planner: the ``Client`` holds state between asks, so
    it is not rebuilt from the ledger (use ``ax``, which replays the history
    into a fresh ``Client`` on every ask). It ignores a shared initial design
    (:attr:`shared_design` is false: the benchmark does not run one for it).

    On each ``ask`` the results in ``history`` that the ``Client`` has not
    been told yet are told: a point it proposed completes (or fails) that
    trial; any other point is attached as a trial of its own. Pending points
    it did not propose are attached and left running. A history that is not
    an extension of the one already told starts a fresh ``Client`` and
    attaches all of it. Pool mode, the parameter mapping and the refusals are
    those of :class:`AxPlanner`.
    """

    name = "ax-native"
    #: the benchmark runs no shared initial design for this planner: Ax makes its own
    shared_design = False

    def __init__(self, problem: Problem, seed: int = 0) -> None:
        super().__init__(problem, seed)
        self._client_: Any = None
        self._told: list[tuple] = []  # row keys of the history items the Client has been told
        self._running: dict[tuple, int] = {}  # row key -> index of a trial the Client awaits

    def _fresh_client(self) -> Any:
        client = self._configured_client(self.seed % _SEED_MODULUS)
        self._told, self._running = [], {}
        return client

    def _tell(self, history: list[HistoryItem], pending: list[dict[str, Any]]) -> None:
        keys = [row_key(h.parameters) for h in history]
        if self._client_ is None or keys[: len(self._told)] != self._told:
            self._client_ = self._fresh_client()
        client = self._client_
        for item, key in zip(history[len(self._told):], keys[len(self._told):], strict=True):
            index = self._running.pop(key, None)
            if index is None:
                index = client.attach_trial(parameters=self._to_ax(item.parameters))
            self._tell_one(client, index, item)
            self._told.append(key)
        for point in pending:
            key = row_key(point)
            if key not in self._running:
                self._running[key] = client.attach_trial(parameters=self._to_ax(point))

    def ask(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]],
            state: dict[str, Any] | None = None) -> list[Proposal]:
        if n < 1:
            return []
        untried = self._untried(n, history, pending)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import ax.api.client  # noqa: F401 - Ax's modules first, then quiet their loggers

            quiet_ax_loggers()
            self._tell(history, pending)
            generated = self._generate(self._client_, n)
        quiet_ax_loggers()
        proposals = self._proposals(self._client_, generated, untried, self.seed)
        for (index, _), p in zip(generated, proposals, strict=True):
            self._running[row_key(p.parameters)] = index  # its result, when it comes, completes this trial
        return proposals
