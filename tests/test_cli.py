"""``labpilot status`` and ``export`` read the right campaign of the right ledger and show it
readably at 80 columns; ``run`` keeps one campaign per directory; ledger text is never markup."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from rich.console import Console

import orchestrator.cli as cli
from orchestrator.cli import main
from orchestrator.ledger import Ledger, sqlite_url
from orchestrator.report import Best
from planners.base import Proposal

DEVICE_ERROR = "[/dev/ttyUSB0] no response"


@pytest.fixture
def screen(monkeypatch):
    """``labpilot``'s console as an 80-column terminal; returns the function that reads it."""
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=80, highlight=False, color_system=None))

    def read() -> str:
        text = out.getvalue()
        out.seek(0)
        out.truncate()
        return text

    return read


def _record(ledger: Ledger, name: str, parameters: list[dict], outcome: str = "y") -> int:
    """A campaign with a completed trial per point but the last, which failed on a device error."""
    cid, _ = ledger.open_campaign(name, {"name": name}, seed=1)
    for i, point in enumerate(parameters):
        tid = ledger.propose(cid, Proposal(parameters=point, planner="bo", seed=1, model_version=f"v{i}",
                                           model_unseen=i % 3, ood_score=0.25 * i))
        ledger.transition(tid, "approved", "system", "in the envelope")
        ledger.transition(tid, "running", "system", "started", instrument="reactor")
        if i < len(parameters) - 1:
            ledger.complete(tid, {outcome: 1.0 / (i + 3)}, run_uid=f"uid-{i}")
        else:
            ledger.transition(tid, "failed", "system", DEVICE_ERROR)
    return cid


@pytest.fixture
def run_dir(tmp_path):
    """A campaign directory whose ledger holds campaign 'demo': 4 trials on two parameters."""
    d = tmp_path / "demo"
    ledger = Ledger.for_directory(d)
    _record(ledger, "demo", [{"x1": 0.1 * i - 5, "x2": 14.0 / (i + 1)} for i in range(4)])
    ledger.close()
    return d


# ---- 80 columns, every trial, and the model's view -------------------------------------------
def _assert_readable(shown: str, names: list[str], trials: int) -> None:
    assert max(len(line) for line in shown.splitlines()) <= 80
    for n in names:  # each name whole on some line, never split across two
        assert re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", shown), n
    for number in range(1, trials + 1):
        assert re.search(rf"(^|\W){number}\W", shown)


def test_status_shows_a_column_per_parameter_and_outcome_at_80_columns(run_dir, screen):
    assert main(["status", str(run_dir)]) == 0
    shown = screen()

    _assert_readable(shown, ["x1", "x2", "y", "unseen", "ood"], trials=4)
    header = next(line for line in shown.splitlines() if "x1" in line)
    assert all(h in header for h in ("trial", "state", "x2", "y", "model", "unseen", "ood"))
    row = next(line for line in shown.splitlines() if "-4.9" in line)  # trial 2: x1 = -4.9
    assert "completed" in row and "v1" in row and "0.25" in row and "0.25" in row


def test_status_of_many_long_parameters_gives_each_trial_a_block_at_80_columns(tmp_path, screen):
    names = [f"temperature_zone_{k}" for k in range(7)]
    ledger = Ledger.for_directory(tmp_path)
    _record(ledger, "wide", [{n: 100.123456 + k + i for k, n in enumerate(names)} for i in range(3)])
    ledger.close()

    assert main(["status", str(tmp_path)]) == 0
    shown = screen()

    _assert_readable(shown, names + ["y"], trials=3)
    assert re.search(r"trial 2\s+completed\s+model v1\s+unseen 1\s+ood 0\.25", shown)
    assert "temperature_zone_6=106.1" in shown


def test_status_shows_a_device_error_with_brackets_as_written(run_dir, screen):
    assert main(["status", str(run_dir)]) == 0

    assert DEVICE_ERROR in " ".join(screen().split())


def test_progress_line_of_a_failed_trial_shows_a_device_error_as_written(screen):
    runtime = SimpleNamespace(best=Best)

    cli.TerminalProgress(live=False).trial_changed(runtime, 3, "failed", DEVICE_ERROR)

    assert DEVICE_ERROR in screen()


def test_validate_quotes_a_bracketed_value_from_the_file_as_written(write_campaign, capsys):
    path = write_campaign("name: x\nparameters:\n  - {name: x1, type: float, lower: '[/x]', upper: 1}\n"
                          "objectives: [{name: y}]\ninstruments: [{name: r, simulator: branin}]\n")

    assert main(["validate", str(path)]) == 2
    assert "(got '[/x]')" in " ".join(capsys.readouterr().err.split())


# ---- which campaign, which ledger ------------------------------------------------------------
def test_ledger_lists_its_campaigns_and_finds_one_by_name(tmp_path):
    ledger = Ledger.for_directory(tmp_path)
    _record(ledger, "a", [{"x": 1.0}])
    _record(ledger, "b", [{"x": 2.0}])

    assert [c.name for c in ledger.campaigns()] == ["a", "b"]
    assert ledger.campaign_by_name("b").name == "b"
    with pytest.raises(LookupError, match=r"no campaign 'c'; it holds \['a', 'b'\]"):
        ledger.campaign_by_name("c")


@pytest.fixture
def two_campaigns(tmp_path):
    """A directory whose ledger already holds two campaigns (as an older labpilot let happen)."""
    ledger = Ledger.for_directory(tmp_path)
    _record(ledger, "first", [{"x1": 1.0}, {"x1": 2.0}])
    _record(ledger, "second", [{"x1": 3.0}, {"x1": 4.0}, {"x1": 5.0}], outcome="z")
    ledger.close()
    return tmp_path


@pytest.mark.parametrize("command", ["status", "export"])
def test_status_and_export_refuse_an_ambiguous_directory_listing_its_campaigns(two_campaigns, command,
                                                                             capsys, screen):
    assert main([command, str(two_campaigns)]) == 2

    err = " ".join(capsys.readouterr().err.split())
    assert "first, second" in err and "--campaign NAME" in err
    assert not (two_campaigns / "trials.csv").exists()


def test_status_and_export_show_the_campaign_chosen_by_name(two_campaigns, screen, capsys):
    assert main(["status", str(two_campaigns), "--campaign", "second"]) == 0
    shown = screen()
    assert "campaign second" in shown and "first" not in shown and " z " in shown

    assert main(["export", str(two_campaigns), "--campaign", "second"]) == 0
    assert len(pd.read_csv(two_campaigns / "trials.csv")) == 3

    assert main(["status", str(two_campaigns), "--campaign", "third"]) == 2
    assert "it holds ['first', 'second']" in " ".join(capsys.readouterr().err.split())


def test_status_and_export_read_a_shared_store_given_by_flag_or_environment(tmp_path, monkeypatch, screen):
    url = sqlite_url(tmp_path / "store")
    ledger = Ledger.for_directory(tmp_path / "store", url)
    _record(ledger, "alpha", [{"x1": 1.0}, {"x1": 2.0}])
    _record(ledger, "beta", [{"x1": 3.0}, {"x1": 4.0}])
    ledger.close()
    out = tmp_path / "out"

    assert main(["status", str(out), "--store", url, "--campaign", "alpha"]) == 0
    assert "campaign alpha" in screen()
    monkeypatch.setenv("LABPILOT_LEDGER_URL", url)
    assert main(["export", str(out), "--campaign", "beta"]) == 0
    assert main(["export", str(out), "--campaign", "alpha"]) == 0

    assert sorted(p.name for p in out.iterdir()) == ["trials-alpha.csv", "trials-beta.csv"]


def test_status_finds_the_store_a_run_noted_in_the_directory(tmp_path, screen):
    url = sqlite_url(tmp_path / "elsewhere")
    ledger = Ledger.for_directory(tmp_path / "elsewhere", url)
    _record(ledger, "noted", [{"x1": 1.0}])
    ledger.close()
    run = tmp_path / "run"
    run.mkdir()
    (run / cli.STORE_POINTER).write_text(json.dumps({"url": url}))

    assert main(["status", str(run)]) == 0
    assert "campaign noted" in screen()


# ---- one campaign per directory ------------------------------------------------------------
CAMPAIGN = """\
name: NAME
parameters:
  - {name: x1, type: float, lower: -5, upper: 10}
  - {name: x2, type: float, lower: 0, upper: 15}
objectives:
  - {name: y, goal: minimize}
planner: {name: sobol}
budget: {max_trials: 2}
instruments:
  - {name: reactor, simulator: branin}
"""


def test_run_of_another_campaign_into_a_directory_that_holds_one_exits_2_naming_both(
        run_dir, write_campaign, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached: refused first
    before = sorted(p.name for p in run_dir.iterdir())

    code = main(["run", str(write_campaign(CAMPAIGN.replace("NAME", "other"))), "--output", str(run_dir)])

    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "'demo'" in err and "'other'" in err and "--output" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before
    ledger = Ledger(sqlite_url(run_dir))
    assert [c.name for c in ledger.campaigns()] == ["demo"]
    ledger.close()


def test_campaign_clash_allows_the_same_campaign_and_a_shared_store(run_dir, write_campaign):
    from orchestrator.settings import Settings
    from orchestrator.spec import load_campaign

    same = load_campaign(write_campaign(CAMPAIGN.replace("NAME", "demo")))
    shared = load_campaign(write_campaign(CAMPAIGN.replace("NAME", "other")
                                          + f"store: {sqlite_url(run_dir.parent / 'store')}\n"))
    other = load_campaign(write_campaign(CAMPAIGN.replace("NAME", "other")))

    assert cli._campaign_clash(same, run_dir, Settings()) is None
    assert cli._campaign_clash(shared, run_dir, Settings()) is None
    assert cli._campaign_clash(other, Path(run_dir.parent / "empty"), Settings()) is None
    assert "holds campaign 'demo'" in cli._campaign_clash(other, run_dir, Settings())


def test_proxy_binds_loopback_by_default_and_warns_when_told_to_bind_wider(capsys):
    """On main `labpilot proxy` bound 0.0.0.0 by default, with no authentication."""
    from orchestrator.cli import build_parser
    from orchestrator.stream import is_loopback as _is_loopback

    args = build_parser().parse_args(["proxy"])
    assert _is_loopback(args.publish) and _is_loopback(args.subscribe)
    assert not _is_loopback("tcp://0.0.0.0:5577") and not _is_loopback("tcp://10.0.0.5:5577")
    assert _is_loopback("tcp://[::1]:5577") and _is_loopback("ipc:///tmp/x")
