"""How fast the console follows and steers a campaign that really runs (run_campaign in a thread
of this process, a simulated Branin reactor, planner sobol, one Prefect server for all runs):

a. result-to-page: for each trial, the wall time of its run's stop document (an ``on_document``
   callback, ``time.time()``) to the moment a headless chromium page on the console shows the
   trial's row as completed (a MutationObserver recording ``Date.now()``; same machine, same
   clock). Once with ``live_source="listeners"`` (``labpilot run --console``), once with
   ``live_source="stream"`` (the console on its own Ledger following the campaign's ZeroMQ
   stream through the ledger's ``stream_address``, as a separate ``labpilot console`` does).
b. 50 websocket clients: the same campaign run with no client and with 50 ``websockets``
   clients reading the live endpoint on their own event loop, interleaved; orchestration
   overhead per trial (``timings["overhead"]``: the loop's own seconds, not planner or instrument).
c. control: "pause" submitted through Control on a separate Ledger (as ``labpilot pause`` does)
   during a run, resumed in between; submit to the command's ``applied_at``, and submit to the
   last trial start (the time after which the campaign dispatched nothing more).

    PYTHONPATH=. .venv/bin/python benchmarks/console_latency.py

writes benchmarks/console_latency.json and benchmarks/console_latency.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_HOME = tempfile.mkdtemp(prefix="labpilot-bench-prefect-")
os.environ.setdefault("PREFECT_HOME", _HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

CAMPAIGN = """
name: {name}
seed: {seed}
parameters:
  - {{name: x1, type: float, lower: -5, upper: 10}}
  - {{name: x2, type: float, lower: 0, upper: 15}}
objectives: [{{name: y, goal: minimize}}]
budget: {{max_trials: {trials}}}
planner: {{name: sobol}}
instruments: [{{name: reactor, simulator: branin, latency: {latency}}}]
approval: {{policy: auto}}
"""
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--disable-gpu", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]

# Every time a trial row turns completed, the page's own clock (Date.now()) is kept per trial.
OBSERVER_JS = """() => {
  window.__seen = {};
  const scan = () => {
    const now = Date.now();
    for (const tr of document.querySelectorAll('#trial-rows tr[data-state=completed]')) {
      const n = tr.dataset.testid.slice('trial-row-'.length);
      if (!(n in window.__seen)) window.__seen[n] = now;
    }
  };
  new MutationObserver(scan).observe(document.getElementById('trial-rows'),
                                     {childList: true, subtree: true, attributes: true});
  S.pageSize = 200;  // every trial on one page
  refresh(['trials']);
}"""


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats_ms(values: list[float]) -> dict[str, float]:
    ms = [1000 * v for v in values]
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 1), "p95_ms": round(pct(ms, 0.95), 1),
            "max_ms": round(max(ms), 1), "min_ms": round(min(ms), 1)}


def epoch(dt: datetime) -> float:
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


class Campaign:
    """A campaign run in a thread, as tests/test_control.py's Running."""

    def __init__(self, directory: Path, name: str, trials: int, latency: float, seed: int = 1) -> None:
        from orchestrator.flows import CampaignRuntime
        from orchestrator.spec import load_campaign

        path = directory / f"{name}.yaml"
        path.write_text(CAMPAIGN.format(name=name, seed=seed, trials=trials, latency=latency))
        self.out = directory / name
        self.stops: dict[str, float] = {}
        self.runtime = CampaignRuntime(load_campaign(path), self.out, on_document=self._doc)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _doc(self, name: str, doc: dict) -> None:
        if name == "stop":
            self.stops[doc["run_start"]] = time.time()

    def _run(self) -> None:
        from orchestrator.flows import run_campaign

        try:
            run_campaign(self.runtime)
        except BaseException as exc:  # noqa: BLE001 - reported below
            self.error = exc
        finally:
            self.runtime.close()

    def start(self) -> Campaign:
        self.thread.start()
        return self

    def join(self, timeout: float = 300) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise SystemExit(f"campaign {self.out.name} did not end")
        if self.error is not None:
            raise SystemExit(f"campaign {self.out.name} failed: {self.error!r}")

    def overhead(self) -> dict[str, float]:
        o = self.runtime.timings["overhead"]
        n = len(self.runtime.timings["instrument"])
        return {"trials": n, "overhead_median_ms": 1000 * statistics.median(o),
                "overhead_per_trial_ms": 1000 * sum(o) / max(1, n)}


def page_latency(browser, tmp: Path, source: str, trials: int, latency: float) -> dict:
    from orchestrator.console import create_app, serve_in_thread
    from orchestrator.ledger import Ledger

    camp = Campaign(tmp, f"page-{source}", trials, latency)
    # listeners: the campaign's own Ledger (in-process hooks); stream: a Ledger of its own, as a
    # separate `labpilot console` process opens it, following the stream_address it names.
    led = camp.runtime.ledger if source == "listeners" else Ledger.for_directory(camp.out)
    app = create_app([led], led, auth_required=False, live_source=source, wait_seconds=3.0, poll_every=0.5)
    server = serve_in_thread(app, "127.0.0.1", 0)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        key = f"0-{camp.runtime.campaign_id}"
        page.goto(f"{server.url}/#c/{key}")
        page.wait_for_function("document.getElementById('live-indicator').textContent === 'live'", timeout=30000)
        page.evaluate(OBSERVER_JS)
        time.sleep(1.0)  # the page settled
        camp.start()
        camp.join()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(page.evaluate("window.__seen")) >= trials:
                break
            time.sleep(0.2)
        seen = {int(k): v / 1000 for k, v in page.evaluate("window.__seen").items()}
        stream_messages = app.state.console.hub.feeds[key].stream_messages if hasattr(
            app.state.console, "hub") else None
    finally:
        context.close()
        server.stop()
    rows = camp.runtime.ledger.trials(camp.runtime.campaign_id, ("completed",))
    lat, missing = [], []
    for t in rows:
        stop = camp.stops.get(t.run_uid or "")
        if stop is None or t.number not in seen:
            missing.append(t.number)
            continue
        lat.append(seen[t.number] - stop)
    out = {"live_source": source, "completed": len(rows), "measured": len(lat), "missing": missing,
           "page_errors": errors, **(stats_ms(lat) if lat else {}),
           "per_trial_ms": [round(1000 * v, 1) for v in lat]}
    if stream_messages is not None:
        out["stream_messages_relayed"] = stream_messages
    return out


class Clients:
    """``n`` websocket clients on the live endpoint, each reading continuously, on one event
    loop in a thread of its own."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.n = url, n
        self.messages = [0] * n
        self.connected = threading.Event()
        self.errors: list[str] = []
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _one(self, i: int, ready: list[int]) -> None:
        import websockets

        try:
            async with websockets.connect(self.url, max_size=None, open_timeout=30) as ws:
                ready.append(i)
                if len(ready) == self.n:
                    self.connected.set()
                while True:
                    await ws.recv()
                    self.messages[i] += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - counted
            self.errors.append(f"{type(exc).__name__}: {exc}")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ready: list[int] = []
        tasks = [asyncio.create_task(self._one(i, ready)) for i in range(self.n)]
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Clients:
        self.thread.start()
        if not self.connected.wait(60):
            raise SystemExit(f"only some of {self.n} websocket clients connected: {self.errors[:3]}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


class ClientProcess:
    """The same clients in a child process of their own (as real clients are: browsers and scripts
    elsewhere), so that their reading does not take this process's GIL from the loop measured."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.n = url, n

    def __enter__(self) -> ClientProcess:
        import subprocess

        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-clients", self.url, str(self.n)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "connected":
            raise SystemExit(f"the websocket clients did not connect: {line!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self.proc.communicate("stop\n", timeout=60)
        got = json.loads(out.strip().splitlines()[-1])
        self.messages, self.errors = got["messages"], got["errors"]


def serve_clients(url: str, n: int) -> None:
    """Child process: connect ``n`` clients, print "connected", read until stdin says stop. At the
    lowest CPU priority: real clients are browsers on other machines, and on a 2-core benchmark
    host their reading must not take the cores from the campaign being measured."""
    os.nice(19)
    with Clients(url, n) as cl:
        print("connected", flush=True)
        sys.stdin.readline()
        time.sleep(0.5)
    print(json.dumps({"messages": cl.messages, "errors": cl.errors[:3]}), flush=True)


class ConsoleProcess:
    """`labpilot console DIR` in a process of its own, following the campaign's stream."""

    def __init__(self, directory: Path) -> None:
        import socket
        import subprocess

        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            self.port = sk.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "console", str(directory),
                                      "--port", str(self.port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/api/campaigns", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.proc.kill()
        raise SystemExit(f"labpilot console did not start: {self.proc.stderr.read()[-500:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def clients_overhead(tmp: Path, pairs: int, trials: int, latency: float, n_clients: int,
                     where: str = "process", console: str = "in-process") -> dict:
    from orchestrator.console import create_app, serve_in_thread

    runs = []
    for i in range(2 * pairs):
        clients = n_clients if i % 2 else 0
        camp = Campaign(tmp, f"clients-{where}-{console}-{i}", trials, latency, seed=1)
        led = camp.runtime.ledger
        if console == "process":
            server = ConsoleProcess(camp.out)
        else:
            app = create_app([led], led, auth_required=False, live_source="listeners", wait_seconds=3.0,
                             poll_every=0.5)
            server = serve_in_thread(app, "127.0.0.1", 0)
        try:
            ws_url = server.url.replace("http://", "ws://") + f"/api/campaigns/0-{camp.runtime.campaign_id}/live"
            if clients:
                with (ClientProcess if where == "process" else Clients)(ws_url, clients) as cl:
                    camp.start()
                    camp.join()
                    time.sleep(0.5)
                got = {"messages_per_client_median": statistics.median(cl.messages), "client_errors": cl.errors[:3]}
            else:
                camp.start()
                camp.join()
                got = {}
        finally:
            server.stop()
        runs.append({"clients": clients, **camp.overhead(), **got})
        print("  ", runs[-1], flush=True)
    summary = {}
    for n in (0, n_clients):
        mine = [r for r in runs if r["clients"] == n]
        summary[str(n)] = {"runs": len(mine),
                           "overhead_median_ms": statistics.median(r["overhead_median_ms"] for r in mine),
                           "overhead_per_trial_ms": statistics.median(r["overhead_per_trial_ms"] for r in mine)}
    base, loaded = summary["0"], summary[str(n_clients)]
    return {"clients": n_clients, "clients_run_in": where, "console": console, "summary": summary,
            "ratio_overhead_median": loaded["overhead_median_ms"] / base["overhead_median_ms"],
            "ratio_overhead_per_trial": loaded["overhead_per_trial_ms"] / base["overhead_per_trial_ms"],
            "runs": runs}


def control_latency(tmp: Path, cycles: int, latency: float) -> dict:
    from orchestrator.control import Actor, Control
    from orchestrator.ledger import Ledger, sqlite_url

    camp = Campaign(tmp, "control", 10000, latency).start()
    cli = Ledger(sqlite_url(camp.out))  # a Ledger of its own, as `labpilot pause DIR` opens
    cid = camp.runtime.campaign_id
    control = Control(cli, cid)
    who = Actor("bench", "operator", "cli")
    applied, last_start, samples = [], [], []

    def starts() -> list[float]:
        return [epoch(t.started_at) for t in cli.trials(cid) if t.started_at is not None]

    def until(check, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise SystemExit("control benchmark: a condition did not happen in time")
            time.sleep(0.02)

    until(lambda: len(starts()) >= 2)
    try:
        for k in range(cycles):
            time.sleep(0.4 + 0.37 * (k % 3))  # pause at varied points of a trial
            t0 = time.time()
            row = control.wait(control.submit("pause", who, reason="benchmark"), timeout=10, poll=0.01)
            if row.status != "applied":
                raise SystemExit(f"pause was {row.status}: {row.outcome}")
            a = epoch(row.applied_at) - t0
            until(lambda: not cli.trials(cid, ("running", "approved")))  # the running trial ends
            time.sleep(0.5)  # and nothing more starts
            last = max(starts()) - t0
            applied.append(a)
            last_start.append(last)
            samples.append({"applied_ms": round(1000 * a, 1), "last_start_ms": round(1000 * last, 1)})
            n_before = len(starts())
            row = control.wait(control.submit("resume", who, reason="benchmark"), timeout=10, poll=0.01)
            until(lambda n=n_before: len(starts()) > n)
    finally:
        control.submit("stop", who, reason="end of benchmark")
        camp.join()
    return {"cycles": cycles, "submit_to_applied": stats_ms(applied),
            "submit_to_last_trial_start": stats_ms(last_start),
            "note": "last_start < 0: the last trial had started before the pause was submitted (a trial "
                    "already running when it was told finishes; nothing new started)",
            "samples": samples}


def write_md(result: dict, path: Path) -> None:
    a = result.get("result_to_page", [])
    c = result.get("control")
    lines = ["# Console latency", "", f"`{result['command']}` on {result['machine']} ({result['wall_seconds']:.0f} s).",
             "", "| measure | n | median ms | p95 ms | target |", "|---|---|---|---|---|"]
    for r in a:
        if "median_ms" in r:
            lines.append(f"| result to page, live_source={r['live_source']} | {r['n']} | {r['median_ms']} | "
                         f"{r['p95_ms']} | p95 < 1000 |")
        else:
            lines.append(f"| result to page, live_source={r['live_source']} | 0 | - | - | {r.get('error', '')} |")
    lines += [] if c is None else [f"| pause: submit to applied_at | {c['submit_to_applied']['n']} | {c['submit_to_applied']['median_ms']} | "
              f"{c['submit_to_applied']['p95_ms']} | |",
              f"| pause: submit to last trial start | {c['submit_to_last_trial_start']['n']} | "
              f"{c['submit_to_last_trial_start']['median_ms']} | {c['submit_to_last_trial_start']['p95_ms']} | |",
              ""]
    for key, label in (("websocket_clients", "console in the campaign's process (run --console), clients in a "
                                             "child process"),
                       ("websocket_clients_console_process", "console as its own process (labpilot console DIR, "
                                                             "following the stream), clients in a child process"),
                       ("websocket_clients_in_process", "clients in a thread of the campaign's process")):
        b = result.get(key)
        if not b:
            continue
        lines += [f"Orchestration overhead, {label}:", "",
                  "| websocket clients | runs | overhead median ms | overhead per trial ms |", "|---|---|---|---|"]
        for n, st in b["summary"].items():
            lines.append(f"| {n} | {st['runs']} | {st['overhead_median_ms']:.3f} | {st['overhead_per_trial_ms']:.3f} |")
        lines += ["", f"Ratio {b['clients']} clients / none: median {b['ratio_overhead_median']:.3f}, per trial "
                  f"{b['ratio_overhead_per_trial']:.3f} (target < 1.10).", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--page-latency", type=float, default=0.2)
    ap.add_argument("--pairs", type=int, default=3, help="(none, 50 clients) runs, interleaved")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--cycles", type=int, default=12)
    ap.add_argument("--serve-clients", nargs=2, metavar=("URL", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=("page", "clients", "control"), action="append",
                    help="run only these parts (repeatable; default all)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "console_latency.json")
    args = ap.parse_args()
    if args.serve_clients:
        serve_clients(args.serve_clients[0], int(args.serve_clients[1]))
        return
    t_all = time.monotonic()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url
    from playwright.sync_api import sync_playwright

    result: dict = {"command": "PYTHONPATH=. .venv/bin/python benchmarks/console_latency.py"
                    + "".join(f" {a}" for a in sys.argv[1:]),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                    "config": {"trials": args.trials, "instrument_latency_s": args.page_latency,
                               "planner": "sobol", "clients": args.clients, "pairs": args.pairs,
                               "pause_cycles": args.cycles}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            parts = set(args.only or ("page", "clients", "control"))
            if "page" in parts:
                print("a. result to page", flush=True)
                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
                    result["result_to_page"] = []
                    for source in ("listeners", "stream"):
                        t0 = time.monotonic()
                        try:
                            r = page_latency(browser, tmp, source, args.trials, args.page_latency)
                        except Exception as exc:  # noqa: BLE001 - reported
                            r = {"live_source": source, "error": f"{type(exc).__name__}: {exc}"}
                        r["seconds"] = round(time.monotonic() - t0, 1)
                        result["result_to_page"].append(r)
                        print("  ", {k: v for k, v in r.items() if k != "per_trial_ms"}, flush=True)
                    browser.close()
            if "clients" in parts:
                for key, console in (("websocket_clients", "in-process"),
                                     ("websocket_clients_console_process", "process")):
                    print(f"b. {args.clients} websocket clients (child process), console {console}", flush=True)
                    result[key] = clients_overhead(tmp, args.pairs, args.trials, args.page_latency, args.clients,
                                                   console=console)
                    print("  ratio", result[key]["ratio_overhead_median"], result[key]["ratio_overhead_per_trial"],
                          flush=True)
            if "control" in parts:
                print("c. control", flush=True)
                result["control"] = control_latency(tmp, args.cycles, args.page_latency)
                print("  ", {k: v for k, v in result["control"].items() if k != "samples"}, flush=True)
    finally:
        server.stop()
    result["wall_seconds"] = round(time.monotonic() - t_all, 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_md(result, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
