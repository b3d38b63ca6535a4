"""The campaign file: bad files are reported with their path in the file and a fix (exit 2);
good files load into a ``CampaignSpec`` with constraints and objectives parsed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.spec import CampaignError, SpecIssue, load_campaign, parse_campaign
from planners.space import LinearConstraint
from simulators.problems import BUNDLED_DATA

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

# A small valid campaign on the Branin simulator (which measures 'y' from x1, x2).
GOOD = """\
name: spec-test
parameters:
  - {name: x1, type: float, lower: -5, upper: 10}
  - {name: x2, type: float, lower: 0, upper: 15}
objectives:
  - {name: y, goal: minimize}
planner: {name: sobol}
instruments:
  - {name: reactor, simulator: branin}
"""


def _validate(path: Path, capsys) -> tuple[int, str, str]:
    """Run ``labpilot validate`` on ``path``; return the exit code, stdout and stderr
    (whitespace collapsed so that the console's line wrapping does not matter)."""
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, " ".join(captured.out.split()), " ".join(captured.err.split())


def _issues(path: Path) -> list[SpecIssue]:
    with pytest.raises(CampaignError) as info:
        load_campaign(path)
    return info.value.issues


def _assert_clean_bad_input(code: int, out: str, err: str) -> None:
    assert code == 2
    assert "Traceback" not in err and "Traceback" not in out
    assert "problem(s) in the campaign file" in err


# ---- bad files: each names its path in the file and says what to write instead ----------
def test_non_numeric_bound_names_the_field_and_asks_for_a_number_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD.replace("lower: -5", "lower: abc"))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "parameters[0].lower" in err
    assert "write a number" in err
    assert "'abc'" in err
    assert [i.path for i in _issues(path)] == ["parameters[0].lower"]


def test_non_integer_budget_names_the_field_and_asks_for_a_whole_number_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD + "budget: {max_trials: lots}\n")

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "budget.max_trials" in err
    assert "write a whole number" in err


def test_reversed_bounds_name_the_parameter_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD.replace("lower: 0, upper: 15", "lower: 15, upper: 0"))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "parameters[1]" in err
    assert "bounds reversed" in err
    assert "swap them" in err
    issues = _issues(path)
    assert len(issues) == 1 and issues[0].path == "parameters[1]"


def test_reversed_integer_bounds_name_the_parameter_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD.replace("{name: x2, type: float, lower: 0, upper: 15}",
                                       "{name: x2, type: int, lower: 9, upper: 2}"))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "parameters[1]" in err
    assert "lower=9 must be below upper=2" in err


def test_log_scale_with_non_positive_lower_bound_says_to_raise_it_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD.replace("lower: 0, upper: 15}", "lower: 0, upper: 15, log_scale: true}"))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "parameters[1]" in err
    assert "log_scale needs lower > 0" in err


def test_parameter_without_type_says_which_types_exist_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD.replace("{name: x1, type: float,", "{name: x1,"))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "parameters[0]" in err
    assert "type: float" in err and "type: categorical" in err


def test_unknown_planner_lists_the_known_planners_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD.replace("planner: {name: sobol}", "planner: {name: bayes}"))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "planner.name" in err
    assert "unknown planner 'bayes'" in err
    for known in ("bo", "random", "sobol"):
        assert f"'{known}'" in err


def test_constraint_naming_an_unknown_parameter_names_it_and_the_known_ones_and_exit_2(
        write_campaign, capsys):
    path = write_campaign(GOOD + "constraints: ['x1 + x9 <= 3']\n")

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "constraints[0]" in err
    assert "unknown parameter 'x9'" in err
    assert "['x1', 'x2']" in err


def test_fractions_group_naming_an_unknown_parameter_is_reported_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD + "constraints: [{fractions: [x1, x7], total: 1}]\n")

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "constraints[0]" in err
    assert "unknown parameter 'x7'" in err


def test_unreadable_constraint_shows_how_to_write_one_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD + "constraints: ['x1 plus x2 at most 3']\n")

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "constraints" in err
    assert "cannot read constraint" in err
    assert "'x1 + 2*x2 <= 10'" in err


def test_constraint_on_an_integer_parameter_says_constraints_take_floats_and_exit_2(
        write_campaign, capsys):
    path = write_campaign(
        GOOD.replace("{name: x2, type: float, lower: 0, upper: 15}", "{name: x2, type: int, lower: 0, upper: 15}")
        + "constraints: ['x1 + x2 <= 3']\n")

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "constraints[0]" in err
    assert "'x2' is not a linear-scale float" in err


def test_objective_the_instrument_does_not_measure_names_what_it_measures_and_exit_2(
        write_campaign, capsys):
    path = write_campaign(GOOD.replace("{name: y, goal: minimize}", "{name: purity, goal: maximize}"))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "objectives[0].name" in err
    assert "'purity' is measured by no instrument" in err and "'reactor'" in err
    assert "['y']" in err


def test_outcome_constraint_on_an_unmeasured_outcome_is_reported_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD + "outcome_constraints: ['purity >= 0.9']\n")

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "outcome_constraints" in err
    assert "'purity' is measured by no instrument" in err


def test_missing_required_fields_are_each_named_as_required_and_exit_2(write_campaign, capsys):
    path = write_campaign("name: spec-test\nparameters:\n  - {name: x1, type: float, lower: 0, upper: 1}\n")

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "2 problem(s)" in err
    assert "objectives: this field is required; add it" in err
    assert "instruments: this field is required; add it" in err
    assert sorted(i.path for i in _issues(path)) == ["instruments", "objectives"]


def test_misspelled_top_level_field_is_called_unknown_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD + "budgte: {max_trials: 3}\n")

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "budgte" in err
    assert "unknown field; remove it or check its spelling" in err


def test_misspelled_nested_field_names_its_full_path_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD.replace("simulator: branin}", "simulator: branin, timout: 3}"))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "instruments[0].timout" in err
    assert "check its spelling" in err


def test_misspelled_planner_option_is_reported_by_validate_and_exit_2(write_campaign, capsys):
    # 'initial_trial' for 'initial_trials': the planner refuses it when the campaign runs,
    # so validation must catch it before then.
    path = write_campaign(GOOD.replace("planner: {name: sobol}",
                                       "planner: {name: bo, options: {initial_trial: 3}}"))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "planner" in err
    assert "initial_trial" in err


def test_malformed_yaml_gives_line_and_column_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD + "budget: {max_trials: 3\n")

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "not valid YAML" in err
    issues = _issues(path)
    assert len(issues) == 1 and issues[0].path.startswith("line ")
    assert "column" in issues[0].path


def test_yaml_that_is_not_a_mapping_says_what_the_file_must_hold_and_exit_2(write_campaign, capsys):
    path = write_campaign("- x1\n- x2\n")

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "must be a YAML mapping" in err


def test_file_that_is_not_text_is_bad_input_not_a_crash(tmp_path, capsys):
    path = tmp_path / "campaign.yaml"
    path.write_bytes(b"name: \xff\xfe\x00 spec-test\n")

    code, out, err = _validate(path, capsys)

    assert code == 2
    assert "Traceback" not in err
    assert str(path) in err


def test_an_error_naming_a_long_path_prints_it_whole_on_one_line(tmp_path, capsys):
    """Seen in a run: the console wrapped the error at 80 columns inside the path
    ('.../campaig n.yaml'), which a user cannot copy back into a command."""
    folder = tmp_path / ("a-campaign-folder-with-a-long-descriptive-name-" * 2)
    folder.mkdir()
    path = folder / "campaign.yaml"
    path.write_bytes(b"name: \xff\xfe\x00 spec-test\n")

    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert any(str(path) in line for line in err.splitlines()), err


def test_missing_file_says_no_such_file_and_exit_2(tmp_path, capsys):
    path = tmp_path / "nowhere.yaml"

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "no such file" in err
    assert "nowhere.yaml" in err


def test_missing_dataset_folder_names_the_instrument_and_the_missing_file_and_exit_2(
        write_campaign, capsys):
    path = write_campaign(GOOD.replace("simulator: branin", "dataset: no_such_table"))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "instruments[0].dataset" in err
    assert "no_such_table" in err
    assert "data.csv and dataset.yaml" in err


def test_unknown_simulator_lists_the_known_ones_and_exit_2(write_campaign, capsys):
    path = write_campaign(GOOD.replace("simulator: branin", "simulator: brainin"))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "instruments[0].simulator" in err
    assert "unknown simulator 'brainin'" in err
    assert "'hartmann6'" in err


def test_several_problems_in_one_file_are_all_reported_at_once(write_campaign, capsys):
    text = (GOOD.replace("lower: -5", "lower: abc")
                .replace("lower: 0, upper: 15", "lower: 15, upper: 0")
                .replace("planner: {name: sobol}", "planner: {name: bayes}")
            + "budgte: 3\n")
    path = write_campaign(text)

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "4 problem(s)" in err
    paths = {i.path for i in _issues(path)}
    assert paths == {"parameters[0].lower", "parameters[1]", "planner.name", "budgte"}


def test_several_cross_field_problems_are_all_reported_at_once(write_campaign):
    path = write_campaign(
        GOOD.replace("{name: y, goal: minimize}", "{name: purity, goal: maximize}")
        + "constraints: ['x1 + x9 <= 3']\nsafety: {limits: {x5: {min: 0}}}\n")

    paths = {i.path for i in _issues(path)}

    assert paths == {"constraints[0]", "objectives[0].name", "safety.limits.x5"}


def test_campaign_error_message_lists_every_issue_with_its_path(write_campaign):
    path = write_campaign("name: spec-test\n")

    with pytest.raises(CampaignError) as info:
        load_campaign(path)

    text = str(info.value)
    assert str(path) in text
    for field in ("parameters", "objectives", "instruments"):
        assert f"  - {field}: this field is required" in text


# ---- good files --------------------------------------------------------------------------
def test_examples_directory_is_not_empty():
    assert len(EXAMPLES) >= 1


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_campaign_validates_with_exit_0(example, capsys):
    code, out, err = _validate(example, capsys)

    assert code == 0, err
    assert out.startswith("ok:")
    assert err == ""


def test_valid_campaign_loads_its_fields_and_defaults(write_campaign):
    spec = load_campaign(write_campaign(GOOD))

    assert spec.name == "spec-test"
    assert [p.name for p in spec.parameters] == ["x1", "x2"]
    assert (spec.parameters[0].lower, spec.parameters[0].upper) == (-5.0, 10.0)
    assert spec.planner.name == "sobol"
    assert spec.budget.max_trials == 30
    assert spec.instruments[0].timeout == 300.0
    assert spec.outcome_names == ["y"]


@pytest.mark.parametrize(
    ("text", "coefficients", "op", "rhs"),
    [
        ("x1 + 2*x2 <= 10", {"x1": 1.0, "x2": 2.0}, "<=", 10.0),
        ("-x1 + x2 >= -3", {"x1": -1.0, "x2": 1.0}, ">=", -3.0),
        ("0.5 x1 - 1.5*x2 == 0.25", {"x1": 0.5, "x2": -1.5}, "==", 0.25),
        ("x1 + x1 <= 4", {"x1": 2.0}, "<=", 4.0),
    ],
)
def test_constraint_strings_parse_into_coefficients_operator_and_bound(text, coefficients, op, rhs):
    c = LinearConstraint.parse(text)

    assert c.coefficients == coefficients
    assert c.op == op
    assert c.rhs == rhs


@pytest.mark.parametrize("text", ["x1 + 2*x2", "x1 < 3", "2*3 <= 4", "<= 3", "x1 + <= 3"])
def test_unreadable_constraint_strings_raise_value_error_with_an_example(text):
    with pytest.raises(ValueError, match=r"constraint"):
        LinearConstraint.parse(text)


def test_parsed_constraint_checks_points_against_its_bound():
    c = LinearConstraint.parse("-x1 + x2 >= -3")

    assert c.satisfied({"x1": 4.0, "x2": 1.0})       # -3 >= -3
    assert not c.satisfied({"x1": 5.0, "x2": 1.0})   # -4 <  -3


def test_constraint_strings_in_a_campaign_become_linear_constraints(write_campaign):
    spec = load_campaign(write_campaign(GOOD + "constraints: ['x1 + 2*x2 <= 10', '-x1 + x2 >= -3']\n"))

    assert spec.constraints == [
        LinearConstraint(coefficients={"x1": 1.0, "x2": 2.0}, op="<=", rhs=10.0),
        LinearConstraint(coefficients={"x1": -1.0, "x2": 1.0}, op=">=", rhs=-3.0),
    ]
    assert spec.search_space().constraints == spec.constraints


def test_fractions_group_becomes_an_equality_constraint_summing_to_the_total(write_campaign):
    spec = load_campaign(write_campaign(GOOD + "constraints: [{fractions: [x1, x2], total: 1}]\n"))

    assert spec.constraints == [LinearConstraint(coefficients={"x1": 1.0, "x2": 1.0}, op="==", rhs=1.0)]


def test_fractions_group_total_defaults_to_one():
    spec = parse_campaign(_data(constraints=[{"fractions": ["x1", "x2"]}]))

    assert spec.constraints[0].op == "=="
    assert spec.constraints[0].rhs == 1.0


def test_fractions_group_with_a_misspelled_key_is_reported():
    with pytest.raises(CampaignError) as info:
        parse_campaign(_data(constraints=[{"fractions": ["x1", "x2"], "totl": 1}]))

    assert any("'totl'" in i.message and i.path.startswith("constraints") for i in info.value.issues)


def test_objective_shorthand_gives_name_and_goal(write_campaign):
    spec = load_campaign(write_campaign(GOOD.replace("  - {name: y, goal: minimize}", "  - y: minimize")))

    assert len(spec.objectives) == 1
    assert spec.objectives[0].name == "y"
    assert spec.objectives[0].goal == "minimize"


def test_objective_shorthand_with_a_bad_goal_names_the_field():
    with pytest.raises(CampaignError) as info:
        parse_campaign(_data(objectives=[{"y": "minimise"}]))

    assert [i.path for i in info.value.issues] == ["objectives[0].goal"]


def test_dataset_folder_given_by_absolute_path_validates(write_campaign):
    text = (
        "name: suzuki-absolute\n"
        "parameters:\n"
        "  - {name: temperature, type: float, lower: 75, upper: 90}\n"
        "  - {name: pd_mol, type: float, lower: 0.5, upper: 5.0}\n"
        "  - {name: arbpin, type: float, lower: 1.0, upper: 1.8}\n"
        "  - {name: k3po4, type: float, lower: 1.5, upper: 3.0}\n"
        "objectives:\n  - yield: maximize\n"
        f"instruments:\n  - {{name: flow, dataset: '{BUNDLED_DATA / 'suzuki'}'}}\n"
    )

    spec = load_campaign(write_campaign(text))

    assert spec.instruments[0].dataset == str(BUNDLED_DATA / "suzuki")
    assert spec.outcome_names == ["yield"]


def test_dataset_folder_is_found_relative_to_the_campaign_file(tmp_path):
    shutil.copytree(BUNDLED_DATA / "suzuki", tmp_path / "tables" / "mine")
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(
        "name: suzuki-relative\n"
        "parameters:\n"
        "  - {name: temperature, type: float, lower: 75, upper: 90}\n"
        "  - {name: pd_mol, type: float, lower: 0.5, upper: 5.0}\n"
        "  - {name: arbpin, type: float, lower: 1.0, upper: 1.8}\n"
        "  - {name: k3po4, type: float, lower: 1.5, upper: 3.0}\n"
        "objectives:\n  - yield: maximize\n"
        "instruments:\n  - {name: flow, dataset: tables/mine}\n"
    )

    spec = load_campaign(campaign)

    assert Path(spec.instruments[0].dataset) == tmp_path / "tables" / "mine"


def _data(**overrides) -> dict:
    """The GOOD campaign as plain data, with some fields replaced."""
    data = {
        "name": "spec-test",
        "parameters": [
            {"name": "x1", "type": "float", "lower": 0.0, "upper": 1.0},
            {"name": "x2", "type": "float", "lower": 0.0, "upper": 1.0},
        ],
        "objectives": [{"name": "y", "goal": "minimize"}],
        "instruments": [{"name": "bench", "device": "tests.lab_factories:bench", "outcomes": ["y"]}],
    }
    data.update(overrides)
    return data


def test_installed_labpilot_command_reports_a_bad_file_and_exits_2(write_campaign):
    """The console script a user types, not just ``main()``: exit code 2, message, no traceback."""
    import subprocess
    import sys

    path = write_campaign(GOOD.replace("upper: 15", "upper: -1"))
    labpilot = Path(sys.executable).parent / "labpilot"
    proc = subprocess.run([str(labpilot), "validate", str(path)], capture_output=True, text=True, timeout=120)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2
    assert "parameters[1]" in err and "bounds reversed" in err
    assert "Traceback" not in proc.stderr


# ---- one report, not rounds --------------------------------------------------------------
def test_field_errors_and_cross_field_errors_are_reported_in_one_run(write_campaign, capsys):
    path = write_campaign(GOOD.replace("planner: {name: sobol}", "planner: {name: sobol}\nbudget: {max_trials: many}")
                          + "constraints: ['x1 + x9 <= 3']\nsafety: {limits: {x5: {min: 0}}}\n")

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    issues = {i.path: i.message for i in _issues(path)}
    assert set(issues) == {"budget.max_trials", "constraints[0]", "safety.limits.x5"}
    assert "write a whole number" in issues["budget.max_trials"]
    assert "unknown parameter 'x9'" in issues["constraints[0]"] and "'x1'" in issues["constraints[0]"]
    assert "unknown parameter 'x5'" in issues["safety.limits.x5"]
    assert "3 problem(s)" in err


def test_a_parameter_with_a_bad_bound_is_not_also_called_unknown_by_its_constraint(write_campaign):
    path = write_campaign(GOOD.replace("lower: -5", "lower: abc")
                          + "constraints: ['x1 + x2 <= 3']\nsafety: {limits: {x1: {min: 0}}}\n")

    assert [i.path for i in _issues(path)] == ["parameters[0].lower"]


def test_cross_field_errors_inside_a_partly_bad_list_are_reported_beside_its_field_errors(write_campaign):
    path = write_campaign(GOOD.replace("{name: reactor, simulator: branin}",
                                       "{name: reactor, simulator: branin, timeout: -1}\n"
                                       "  - {name: other, simulator: brainin}")
                          .replace("{name: y, goal: minimize}", "{name: y, goal: minimize}\n  - {name: y, goal: up}"))

    paths = {i.path for i in _issues(path)}

    assert paths == {"instruments[0].timeout", "instruments[1].simulator", "objectives[1].goal",
                     "objectives[1].name"}


# ---- a device factory is found at validate time -------------------------------------------
DEVICE = GOOD.replace("{name: reactor, simulator: branin}",
                      "{name: reactor, device: 'FACTORY', outcomes: [y]}")


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A module ``labfactory_<n>`` on sys.path that defines ``make_reactor`` and a constant; importing
    it would fail, so a passing check shows the module was read, not run."""
    name = f"labfactory_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "raise RuntimeError('imported')\n\nLIMIT = 3\n\n\ndef make_reactor():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_device_factory_that_exists_validates_without_importing_its_module(write_campaign, factory_module,
                                                                          capsys):
    import sys

    path = write_campaign(DEVICE.replace("FACTORY", f"{factory_module}:make_reactor"))

    code, out, err = _validate(path, capsys)

    assert code == 0, err
    assert factory_module not in sys.modules


@pytest.mark.parametrize("device, says", [
    ("labpilot_no_such_pkg.lab:make_reactor", "no module 'labpilot_no_such_pkg' can be found"),
    ("MODULE:make_reactr", "has no 'make_reactr'"),
    ("MODULE", "write it as package.module:factory"),
])
def test_device_factory_that_cannot_be_found_names_the_field_and_exit_2(device, says, write_campaign,
                                                                        factory_module, capsys):
    path = write_campaign(DEVICE.replace("FACTORY", device.replace("MODULE", factory_module)))

    code, out, err = _validate(path, capsys)

    _assert_clean_bad_input(code, out, err)
    assert "instruments[0].device" in err and says in err


def test_device_factory_bound_by_assignment_is_imported_to_check_it_is_callable(write_campaign, tmp_path,
                                                                                 monkeypatch):
    (tmp_path / "labfactory_assigned.py").write_text("LIMIT = 3\nmake_reactor = dict\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    load_campaign(write_campaign(DEVICE.replace("FACTORY", "labfactory_assigned:make_reactor")))
    issues = _issues(write_campaign(DEVICE.replace("FACTORY", "labfactory_assigned:LIMIT")))

    assert [i.path for i in issues] == ["instruments[0].device"]
    assert "not a factory" in issues[0].message


def test_planner_options_read_from_source_match_the_imported_signatures():
    import importlib
    import inspect

    from orchestrator.spec import planner_options
    from planners import PLANNERS, Planner

    for name, target in PLANNERS.items():
        module, cls = target.split(":")
        klass = getattr(importlib.import_module(module), cls)
        params = inspect.signature(klass.__init__).parameters
        expected = None if any(p.kind is p.VAR_KEYWORD for p in params.values()) else \
            [n for n in params if n not in ("self", "problem", "seed")]
        if klass.__init__ is Planner.__init__:
            expected = []  # it takes **options only to refuse them by name
        assert planner_options(name) == expected, name


def test_an_option_of_a_planner_that_takes_none_is_refused_at_validate_time(write_campaign):
    """On main `planner: {name: sobol, options: {bogus: 1}}` passed validate and failed at run time."""
    path = write_campaign(GOOD.replace("planner: {name: sobol}", "planner: {name: sobol, options: {bogus: 1}}"))
    with pytest.raises(CampaignError) as err:
        load_campaign(path)
    assert any(i.path == "planner.options.bogus" for i in err.value.issues)


# ---- validating is light -----------------------------------------------------------------
HEAVY = ("botorch", "gpytorch", "ax", "prefect", "bluesky", "ophyd", "scipy", "sqlalchemy")


def _modules_after_validating(path: Path) -> set[str]:
    """The top-level modules a fresh interpreter holds after ``labpilot validate path`` (exit 0)."""
    import subprocess
    import sys

    code = ("import sys\nfrom orchestrator.cli import main\n"
            f"assert main(['validate', {str(path)!r}]) == 0\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split("\n")[-2].split())


def test_validating_a_device_campaign_imports_no_planner_instrument_or_prefect_stack(write_campaign):
    path = write_campaign(DEVICE.replace("FACTORY", "tests.lab_factories:bench")
                          .replace("planner: {name: sobol}", "planner: {name: bo, options: {initial_trials: 4}}"))

    loaded = _modules_after_validating(path)

    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_validating_a_device_campaign_does_not_import_torch(write_campaign):
    path = write_campaign(DEVICE.replace("FACTORY", "tests.lab_factories:bench"))

    assert "torch" not in _modules_after_validating(path)


@pytest.mark.parametrize("example", ["branin.yaml", "suzuki_table.yaml"])
def test_validating_a_simulator_or_table_campaign_imports_no_torch_or_heavy_stack(example):
    """On main validating examples/branin.yaml imported torch, BoTorch, ophyd and bluesky (6.6 s
    on a quiet machine, 23-49 s under load); the simulators' parameters are read without them."""
    loaded = _modules_after_validating(ROOT / "examples" / example)

    assert not loaded & {"torch", *HEAVY}, loaded & {"torch", *HEAVY}

