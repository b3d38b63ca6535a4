"""Malformed campaign files: each is refused by ``load_campaign`` (``labpilot validate``, exit 2)
with an issue naming the field, instead of passing and failing at run time."""

from __future__ import annotations

import pytest

from orchestrator.spec import CampaignError, load_campaign

BASE = """\
name: malformed
seed: 1
parameters:
  - {name: x1, type: float, lower: -5, upper: 10}
  - {name: x2, type: float, lower: 0, upper: 15}
objectives: [{name: y, goal: minimize}]
budget: {max_trials: 4}
planner: {name: sobol}
instruments: [{name: reactor, simulator: branin}]
"""


def _with(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new)


BOMB = "planner:\n  name: sobol\n  options:\n    a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"    {chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
DEEP = "description: ok\nextra:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(40)) + "  " * 41 + "v: 1\n"

MALFORMED = [
    # (what, file text, a text the issue's path holds)
    ("float bound NaN", _with("upper: 10}", "upper: .nan}"), "parameters[0].upper"),
    ("float bound inf", _with("upper: 15}", "upper: .inf}"), "parameters[1].upper"),
    ("lower -inf", _with("lower: -5,", "lower: -.inf,"), "parameters[0].lower"),
    ("safety max NaN", BASE + "safety: {limits: {x1: {max: .nan}}}\n", "safety.limits.x1.max"),
    ("safety min -inf", BASE + "safety: {limits: {x1: {min: -.inf}}}\n", "safety.limits.x1.min"),
    ("fractions total NaN", _with("parameters:\n", "parameters:\n  - {name: f1, type: float, lower: 0, upper: 1}\n"
                                   "  - {name: f2, type: float, lower: 0, upper: 1}\n")
     + "constraints: [{fractions: [f1, f2], total: .nan}]\n", "constraints[0].total"),
    ("target NaN", _with("{name: y, goal: minimize}", "{name: y, goal: target, target: .nan}"), "objectives[0].target"),
    ("timeout inf", _with("simulator: branin}", "simulator: branin, timeout: .inf}"), "instruments[0].timeout"),
    ("wall time NaN", _with("{max_trials: 4}", "{max_trials: 4, max_wall_time: .nan}"), "budget.max_wall_time"),
    ("noise inf", _with("simulator: branin}", "simulator: branin, noise: .inf}"), "instruments[0].noise"),
    ("drift NaN", _with("simulator: branin}", "simulator: branin, drift: .nan}"), "instruments[0].drift"),
    ("seed 10^30", _with("seed: 1", "seed: 1000000000000000000000000000000"), "seed"),
    ("seed negative", _with("seed: 1", "seed: -1"), "seed"),
    ("seed 2^32", _with("seed: 1", "seed: 4294967296"), "seed"),
    ("alias bomb", BASE.replace("planner: {name: sobol}\n", BOMB), "line"),
    ("one alias", BASE + "description: &d hello\noutput: *d\n", "line"),
    ("deep nesting", BASE + DEEP, "line"),
    ("duplicate budget", BASE + "budget: {max_trials: 400}\n", "line"),
    ("duplicate nested key", _with("{max_trials: 4}", "{max_trials: 4, max_trials: 9}"), "line"),
    ("bo initial_trials -3", _with("{name: sobol}", "{name: bo, options: {initial_trials: -3}}"),
     "planner.options.initial_trials"),
    ("bo num_restarts 0", _with("{name: sobol}", "{name: bo, options: {num_restarts: 0}}"),
     "planner.options.num_restarts"),
    ("bo raw_samples text", _with("{name: sobol}", "{name: bo, options: {raw_samples: many}}"),
     "planner.options.raw_samples"),
    ("bo raw_samples 2.5", _with("{name: sobol}", "{name: bo, options: {raw_samples: 2.5}}"),
     "planner.options.raw_samples"),
    ("bo feasibility_model text", _with("{name: sobol}", "{name: bo, options: {feasibility_model: maybe}}"),
     "planner.options.feasibility_model"),
    ("bo initial_trials true", _with("{name: sobol}", "{name: bo, options: {initial_trials: true}}"),
     "planner.options.initial_trials"),
    ("outcome named parent", _with("instruments: [{name: reactor, simulator: branin}]",
                                   "instruments: [{name: reactor, device: 'simulators.devices:make_simulated_device', "
                                   "outcomes: [y, parent]}]"), "instruments[0].outcomes[1]"),
    ("objective named read", _with("{name: y, goal: minimize}", "{name: read, goal: minimize}")
     .replace("simulator: branin}", "device: 'simulators.devices:make_simulated_device', outcomes: [read]}"),
     "objectives[0].name"),
    ("parameter named name", _with("{name: x2, type: float", "{name: name, type: float")
     .replace("simulator: branin}", "device: 'simulators.devices:make_simulated_device', outcomes: [y]}"),
     "parameters[1].name"),
    ("names collide on the device", _with("{name: x1, type", "{name: x-2, type").replace("{name: x2, type", "{name: x_2, type")
     .replace("simulator: branin}", "device: 'simulators.devices:make_simulated_device', outcomes: [y]}"),
     "parameters[1].name"),
    ("store unknown driver", BASE + "store: 'oracle+cx://u@h/db'\n", "store"),
    ("store driver not installed", BASE + "store: 'mysql+mysqldb://u@h/db'\n", "store"),
    ("store nonsense", BASE + "store: 'ledger.sqlite'\n", "store"),
    ("store in memory", BASE + "store: 'sqlite:///:memory:'\n", "store"),
    ("store empty sqlite", BASE + "store: 'sqlite://'\n", "store"),
    ("one choice", _with("parameters:\n", "parameters:\n  - {name: s, type: categorical, choices: [water]}\n"),
     "parameters[0].choices"),
    ("campaign ..", _with("name: malformed", "name: '..'"), "name"),
    ("campaign .", _with("name: malformed", "name: '.'"), "name"),
    ("campaign with slash", _with("name: malformed", "name: a/b"), "name"),
    ("campaign too long", _with("name: malformed", "name: " + "a" * 300), "name"),
    ("budget NaN trials", _with("{max_trials: 4}", "{max_trials: .nan}"), "budget.max_trials"),
    ("constraint rhs inf", BASE + "constraints: ['x1 + x2 <= .inf']\n", "constraints[0]"),
    ("latency inf", _with("simulator: branin}", "simulator: branin, latency: .inf}"), "instruments[0].latency"),
    ("noise on real hardware", _with("{name: reactor, simulator: branin}",
                                     "{name: reactor, device: 'tests.lab_factories:bench', outcomes: [y], "
                                     "noise: 0.1}"), "instruments[0]"),
    ("latency on an epics instrument", _with("{name: reactor, simulator: branin}",
                                             "{name: reactor, latency: 1, epics: {parameters: {x1: x1, x2: x2}, "
                                             "results: {y: y}}}"), "instruments[0]"),
    ("two stations on one IOC's PVs", _with("{name: reactor, simulator: branin}",
                                            "{name: reactor, concurrency: 2, epics: {parameters: {x1: x1, x2: x2}, "
                                            "results: {y: y}}}"), "instruments[0]"),
    ("latency negative", _with("simulator: branin}", "simulator: branin, latency: -1}"), "instruments[0].latency"),
    ("latency range reversed", _with("simulator: branin}", "simulator: branin, latency: [2, 1]}"),
     "instruments[0].latency"),
    ("latency range of three", _with("simulator: branin}", "simulator: branin, latency: [1, 2, 3]}"),
     "instruments[0].latency"),
    ("choice NaN", _with("parameters:\n", "parameters:\n  - {name: s, type: categorical, choices: [1.5, .nan]}\n"),
     "parameters[0].choices[1]"),
    ("forbidden unknown parameter", BASE + "safety: {forbidden: ['x1 + x9 >= 3']}\n", "safety.forbidden[0]"),
    ("forbidden unreadable", BASE + "safety: {forbidden: ['x1 >> 3']}\n", "safety.forbidden[0]"),
    ("forbidden ==", BASE + "safety: {forbidden: ['x1 == 3']}\n", "safety.forbidden[0]"),
    ("forbidden on a categorical", _with("parameters:\n", "parameters:\n  - {name: s, type: categorical, "
                                         "choices: [1, 2]}\n") + "safety: {forbidden: ['s + x1 >= 3']}\n",
     "safety.forbidden[0]"),
    ("max_step unknown parameter", BASE + "safety: {max_step: {x9: 1}}\n", "safety.max_step.x9"),
    ("max_step zero", BASE + "safety: {max_step: {x1: 0}}\n", "safety.max_step.x1"),
    ("max_step negative", BASE + "safety: {max_step: {x1: -2}}\n", "safety.max_step.x1"),
    ("max_step text", BASE + "safety: {max_step: {x1: far}}\n", "safety.max_step.x1"),
    ("max_step on a categorical", _with("parameters:\n", "parameters:\n  - {name: s, type: categorical, "
                                        "choices: [a, b]}\n") + "safety: {max_step: {s: 1}}\n", "safety.max_step.s"),
    ("allowed not a choice", _with("parameters:\n", "parameters:\n  - {name: s, type: categorical, "
                                   "choices: [a, b]}\n") + "safety: {allowed: {s: [a, c]}}\n", "safety.allowed.s"),
    ("allowed empty", _with("parameters:\n", "parameters:\n  - {name: s, type: categorical, "
                            "choices: [a, b]}\n") + "safety: {allowed: {s: []}}\n", "safety.allowed.s"),
    ("allowed on a float", BASE + "safety: {allowed: {x1: [1.0]}}\n", "safety.allowed.x1"),
    ("allowed unknown parameter", BASE + "safety: {allowed: {s: [a]}}\n", "safety.allowed.s"),
    ("rate zero", BASE + "safety: {max_trials_per_hour: 0}\n", "safety.max_trials_per_hour"),
    ("rate fractional", BASE + "safety: {max_trials_per_hour: 2.5}\n", "safety.max_trials_per_hour"),
    ("rate unknown instrument", BASE + "safety: {max_trials_per_hour: {hplc: 3}}\n",
     "safety.max_trials_per_hour.hplc"),
    ("rate negative per instrument", BASE + "safety: {max_trials_per_hour: {reactor: -1}}\n",
     "safety.max_trials_per_hour.reactor"),
    ("unknown sobol option", _with("{name: sobol}", "{name: sobol, options: {heat: 1}}"), "planner.options.heat"),
]


@pytest.mark.parametrize("what, text, field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_campaign_file_is_refused_naming_the_field(tmp_path, what, text, field):
    path = tmp_path / "campaign.yaml"
    path.write_text(text)
    with pytest.raises(CampaignError) as err:
        load_campaign(path)
    assert any(field in issue.path for issue in err.value.issues), (what, [str(i) for i in err.value.issues])


def test_the_base_file_is_valid(tmp_path):
    path = tmp_path / "campaign.yaml"
    path.write_text(BASE)
    assert load_campaign(path).name == "malformed"


def test_one_choice_says_a_choice_needs_two(tmp_path):
    path = tmp_path / "campaign.yaml"
    path.write_text(MALFORMED[[m[0] for m in MALFORMED].index("one choice")][1])
    with pytest.raises(CampaignError, match="at least 2"):
        load_campaign(path)


def test_the_new_safety_fields_are_valid_as_documented(tmp_path):
    path = tmp_path / "campaign.yaml"
    path.write_text(_with("parameters:\n", "parameters:\n  - {name: s, type: categorical, choices: [water, ethanol]}\n")
                    .replace("simulator: branin}", "device: 'tests.envelope_device:make_reactor', outcomes: [y]}")
                    + "safety:\n  forbidden: ['x1 + x2 >= 12']\n  max_step: {x1: 2.0}\n"
                    "  max_trials_per_hour: {reactor: 30}\n  allowed: {s: [water]}\n")
    safety = load_campaign(path).safety
    assert safety.max_step == {"x1": 2.0} and safety.allowed == {"s": ["water"]}
    assert safety.rate_limit("reactor") == 30 and safety.rate_limit("hplc") is None
    assert str(safety.forbidden[0]) == "1*x1 + 1*x2 >= 12"


def test_a_bad_new_safety_field_says_what_to_write(tmp_path):
    path = tmp_path / "campaign.yaml"
    path.write_text(BASE + "safety: {max_step: {x1: 0}, max_trials_per_hour: {hplc: 3}}\n")
    with pytest.raises(CampaignError) as err:
        load_campaign(path)
    issues = {i.path: i.message for i in err.value.issues}
    assert "positive number" in issues["safety.max_step.x1"]
    assert "unknown instrument 'hplc'" in issues["safety.max_trials_per_hour.hplc"]


def test_a_recorded_spec_of_real_hardware_reads_back(tmp_path):
    """The ledger records the spec as a dump (every field, defaults too); reading it back (the
    control layer does) must not take the defaults for simulated behaviour given by hand."""
    from orchestrator.spec import CampaignSpec

    path = tmp_path / "campaign.yaml"
    path.write_text(_with("{name: reactor, simulator: branin}",
                          "{name: reactor, device: 'tests.lab_factories:bench', outcomes: [y]}"))
    spec = load_campaign(path)
    again = CampaignSpec.model_validate(spec.model_dump(mode="json"))
    assert again.instruments[0].kind == "ophyd"
