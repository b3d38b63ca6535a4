"""``labpilot report DIR``: one self-contained HTML file (nothing fetched from outside) with every
plot, and the PNGs beside it."""

from __future__ import annotations

import re

import pytest

from orchestrator.console.report_html import write_report
from orchestrator.ledger import Ledger
from tests.console_factories import build_campaign


@pytest.mark.parametrize("example,plots", [("branin.yaml", {"best", "objective", "parameters", "calibration"}),
                                           ("branincurrin.yaml", {"best", "objective", "parameters", "pareto",
                                                                  "calibration"})])
def test_report_is_self_contained_and_has_every_plot(tmp_path, example, plots):
    led = Ledger.for_directory(tmp_path)
    cid = build_campaign(led, example)
    out = write_report(led, cid, tmp_path / "out" / "report.html")
    led.close()
    text = out["html"].read_text()
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)\s*=\s*["']?(https?:)?//""", text, re.I)
    assert "Plotly.newPlot" in text and len(text) > 3_000_000  # plotly.js inlined
    for name in plots:
        assert f'id="plot-{name}"' in text
    assert ("plot-pareto" in text) == ("pareto" in plots)
    names = {p.name for p in out["pngs"]}
    assert names == {f"report-{n}.png" for n in plots}
    for p in out["pngs"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000


def test_report_command_picks_the_only_campaign_and_says_what_to_pass_otherwise(tmp_path, capsys):
    import argparse

    from orchestrator.console.commands import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    led = Ledger.for_directory(tmp_path)
    build_campaign(led, n_done=3, waiting=0)
    led.close()
    a = parser.parse_args(["report", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert a.func(a) == 0 and (tmp_path / "r.html").is_file() and (tmp_path / "r-best.png").is_file()
    led = Ledger.for_directory(tmp_path)
    build_campaign(led, "branincurrin.yaml", n_done=3, waiting=0)
    led.close()
    a = parser.parse_args(["report", str(tmp_path)])
    assert a.func(a) == 2 and "--campaign NAME" in capsys.readouterr().err
    a = parser.parse_args(["report", str(tmp_path), "--campaign", "branincurrin"])
    assert a.func(a) == 0 and (tmp_path / "report-pareto.png").is_file()
