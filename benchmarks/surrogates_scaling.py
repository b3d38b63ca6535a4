"""How the surrogates scale with data: fit, warm-started update and prediction times, and held-out quality.

Data: noisy Hartmann6 (BoTorch's ``Hartmann(dim=6)``, noise sd 0.05) at
uniform random points of the unit cube, seeded per size; quality on 1,000
fresh noisy points (the same for every size): RMSE against the noisy values,
coverage of the central 95 % interval of the predictive distribution (latent
+ noise), and mean Gaussian NLL.

For every size and model:
  - fit: time to fit from scratch (median of ``--repeats`` fits when n <= 500,
    one fit above);
  - update: time of ``update`` with all the data plus one new point,
    warm-started from the fitted model (median of ``--repeats`` successive
    updates; for the GP with ``refit=True`` (short warm-started refit) and
    with ``refit=False`` (condition only));
  - predict: time to predict 1,000 points (the first call after a fit or
    update, which for the GP includes its O(n^3) prediction cache, and the
    median of ``--repeats`` further calls).
On the CPU, and on CUDA too when it is available (``--device``).

The exact GP's fit iterations are capped (``--gp-fit-maxiter``, and
``--gp-large-fit-maxiter`` above ``--gp-large-n`` points); the table says how
many it ran. Sizes above ``--gp-max-n`` skip the GP and say so.

Usage (writes JSON, and a Markdown table beside it):
    .venv/bin/python benchmarks/surrogates_scaling.py --sizes 100 500 1000 2000 5000 \\
        --out benchmarks/surrogates_scaling.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from botorch.test_functions import Hartmann

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planners.surrogates import DeepEnsemble, ExactGP  # noqa: E402

NOISE_SD = 0.05
TEST_POINTS = 1000
TEST_SEED = 12345
D = 6


def hartmann_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n x 6`` uniform points and ``n x 1`` noisy Hartmann6 values (double, CPU)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, D, generator=g, dtype=torch.double)
    y = Hartmann(dim=D)(X) + NOISE_SD * torch.randn(n, generator=g, dtype=torch.double)
    return X, y.unsqueeze(-1)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall time of ``fn()`` (waiting for the GPU when there is one) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def quality(surrogate: Any, X: torch.Tensor, Y: torch.Tensor) -> dict[str, float]:
    mean, var = surrogate.predict(X)
    mean, var = mean.cpu(), var.cpu().clamp_min(1e-12)
    err = mean - Y
    nll = 0.5 * torch.log(2 * math.pi * var) + 0.5 * err.pow(2) / var
    return {"rmse": float(err.pow(2).mean().sqrt()),
            "coverage95": float((err.abs() <= 1.96 * var.sqrt()).double().mean()),
            "nll": float(nll.mean())}


def predict_times(surrogate: Any, X: torch.Tensor, device: torch.device, repeats: int) -> dict[str, float]:
    first, _ = timed(lambda: surrogate.predict(X), device)
    rest = [timed(lambda: surrogate.predict(X), device)[0] for _ in range(repeats)]
    return {"predict_first_s": first, "predict_s": statistics.median(rest)}


def bench_gp(n: int, device: torch.device, args: argparse.Namespace, X: torch.Tensor, Y: torch.Tensor,
             Xt: torch.Tensor, Yt: torch.Tensor) -> dict[str, Any]:
    maxiter = args.gp_large_fit_maxiter if n > args.gp_large_n else args.gp_fit_maxiter
    row: dict[str, Any] = {"model": "ExactGP", "fit_maxiter": maxiter}
    fits = args.repeats if n <= 500 else 1
    times, metrics = [], []
    gp = None
    for _ in range(fits):
        gp = ExactGP(fit_maxiter=maxiter, device=device, fit_timeout_s=args.gp_fit_timeout)
        t, m = timed(lambda gp=gp: gp.fit(X[:n], Y[:n]), device)
        times.append(t)
        metrics.append(m)
    row.update(fit_s=statistics.median(times), fit_iterations=metrics[-1]["iterations"])
    if args.gp_fit_timeout is not None and metrics[-1]["seconds"] >= args.gp_fit_timeout:
        row["note"] = f"fit stopped by the {args.gp_fit_timeout:g} s timeout"
    row.update(predict_times(gp, Xt, device, args.repeats))
    row.update(quality(gp, Xt, Yt))
    fitted = gp.state_dict()
    update_repeats = args.repeats if n <= args.gp_large_n else 1
    for refit, key in ((True, "update_s"), (False, "update_norefit_s")):
        model = ExactGP.from_state_dict(fitted, device=device)
        model.update_maxiter = args.gp_update_maxiter
        times, iterations, first_predict = [], [], []
        for i in range(1, update_repeats + 1):
            t, m = timed(lambda model=model, i=i, refit=refit: model.update(X[:n + i], Y[:n + i], refit=refit),
                         device)
            times.append(t)
            iterations.append(m["iterations"])
            first_predict.append(timed(lambda model=model: model.predict(Xt), device)[0])
        row[key] = statistics.median(times)
        row[key.replace("_s", "_then_predict_s")] = statistics.median(
            [a + b for a, b in zip(times, first_predict, strict=True)])
        if refit:
            row["update_iterations"] = statistics.median(iterations)
    return row


def bench_ensemble(n: int, device: torch.device, args: argparse.Namespace, X: torch.Tensor,
                   Y: torch.Tensor, Xt: torch.Tensor, Yt: torch.Tensor) -> dict[str, Any]:
    row: dict[str, Any] = {"model": "DeepEnsemble"}
    fits = args.repeats if n <= 500 else 1
    times, metrics = [], []
    ens = None
    for _ in range(fits):
        ens = DeepEnsemble(device=device, seed=0)
        t, m = timed(lambda ens=ens: ens.fit(X[:n], Y[:n]), device)
        times.append(t)
        metrics.append(m)
    row.update(fit_s=statistics.median(times), fit_steps=metrics[-1]["steps"])
    row.update(predict_times(ens, Xt, device, args.repeats))
    row.update(quality(ens, Xt, Yt))
    times, steps = [], []
    for i in range(1, args.repeats + 1):
        t, m = timed(lambda i=i: ens.update(X[:n + i], Y[:n + i]), device)
        times.append(t)
        steps.append(m["steps"])
    row.update(update_s=statistics.median(times), update_steps=statistics.median(steps))
    row.update({f"after_updates_{k}": v for k, v in quality(ens, Xt, Yt).items()})
    return row


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Surrogate scaling on noisy Hartmann6",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} CPU threads; "
        f"load average at start {meta['loadavg']}.  ",
        f"Noise sd {NOISE_SD}; quality on {TEST_POINTS} fresh noisy points; times in seconds "
        f"(medians of {meta['repeats']} where repeated).",
        "",
        "| device | model | n | fit | fit iters/steps | update | update (GP, refit=False) | "
        "update + 1st predict | predict 1k (1st / later) | RMSE | 95% cov | NLL | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def f(x: Any, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)

    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['device']} | {r['model']} | {r['n']} | - | - | - | - | - | - | - | - | - | "
                         f"{r['skipped']} |")
            continue
        iters = (f"{r['fit_iterations']} (cap {r['fit_maxiter']}); update {f(r['update_iterations'])}"
                 if r["model"] == "ExactGP" else f"{r['fit_steps']}; update {f(r['update_steps'])}")
        then = r.get("update_then_predict_s")
        if r["model"] == "ExactGP":
            then = f"{f(then)} / {f(r.get('update_norefit_then_predict_s'))}"
        lines.append(
            f"| {r['device']} | {r['model']} | {r['n']} | {f(r['fit_s'])} | {iters} | {f(r['update_s'])} | "
            f"{f(r.get('update_norefit_s'))} | {then if r['model'] == 'ExactGP' else '-'} | "
            f"{f(r['predict_first_s'])} / {f(r['predict_s'])} | {f(r['rmse'])} | {f(r['coverage95'])} | "
            f"{f(r['nll'])} | {r.get('note', '')} |")
    lines += ["", "update + 1st predict (GP): refit=True / refit=False; the GP builds its prediction cache "
              "(one O(n^3) solve) on the first prediction after a fit or update.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000, 2000, 5000])
    parser.add_argument("--models", nargs="+", choices=["gp", "ensemble"], default=["gp", "ensemble"])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                        help="all: the CPU, and CUDA when available")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--gp-fit-maxiter", type=int, default=50)
    parser.add_argument("--gp-large-n", type=int, default=2000)
    parser.add_argument("--gp-large-fit-maxiter", type=int, default=15)
    parser.add_argument("--gp-update-maxiter", type=int, default=10)
    parser.add_argument("--gp-fit-timeout", type=float, default=None, help="seconds; cap on one GP fit")
    parser.add_argument("--gp-max-n", type=int, default=5000, help="skip the GP above this many points")
    parser.add_argument("--out", type=Path, default=None, help="JSON file; a .md table is written beside it")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"],
               "all": ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]}[args.device]
    devices = [torch.device(d) for d in devices]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}"
    result: dict[str, Any] = {"meta": {
        "command": " ".join([".venv/bin/python", "benchmarks/surrogates_scaling.py", *(argv or sys.argv[1:])]),
        "machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()], "repeats": args.repeats,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, "rows": []}
    Xt, Yt = hartmann_data(TEST_POINTS, TEST_SEED)
    for device in devices:
        for n in args.sizes:
            X, Y = hartmann_data(n + args.repeats, seed=n)
            for name in args.models:
                if name == "gp" and n > args.gp_max_n:
                    row = {"model": "ExactGP", "skipped": f"GP skipped above {args.gp_max_n} points"}
                elif name == "gp":
                    row = bench_gp(n, device, args, X, Y, Xt, Yt)
                else:
                    row = bench_ensemble(n, device, args, X, Y, Xt, Yt)
                row = {"device": device.type, "n": n, **row}
                result["rows"].append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                      flush=True)
    table = markdown(result)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table)
    return result


if __name__ == "__main__":
    main()
