"""Cost-model accuracy: predicted against measured attention kernel and linear layer times on the present device.

    python bench/cost_model.py --quick            # CPU: 2 shapes, < 1 minute
    python bench/cost_model.py                    # CUDA when present (else CPU): the full grid
    python bench/cost_model.py --statistic min    # CPU shared with other jobs: min of the runs
    python bench/cost_model.py --threads 2        # CPU: time with 2 torch threads (default 1)
    python bench/cost_model.py --no-linear        # attention only

Candidates are cost_models.measure.default_grid: families (dense, window, multi_diagonal, columns,
a_shape, vertical_slash, block_sparse) x densities x tiles x layer shapes (on CPU the band and
block families also through the executor's native kernels: "native" in the JSON). Each is timed (Triton
kernels with do_bench on CUDA; the CPU executor, median or min of repeated runs, on CPU), then:

  before     the published profile's predictions
  after      the profile fitted to all the measurements (what is stored for the device)
  held-out   each layer shape predicted by a profile fitted to the other shapes only: the
             accuracy to expect on a layer the fit has not seen

For each: Spearman rank correlation over every candidate, and the top-1 regret per decision
(Candidate.decision: which family and tiles for one layer shape at one density; the measured time
of the model's fastest pick over the measured fastest, - 1), mean and worst.

Linear layers (cost_models.linear_measure.linear_grid: dense, block-sparse at several densities,
N:M and, on a CPU with the native kernels, scattered zeros; a few weight shapes and token counts,
run through the compiled op) are timed too and fitted
with the attention terms; for them, before and after: Spearman, and the compiler's sparse-or-dense
choice on each sparse weight and token count (right or not, and its loss). Prints rich tables;
writes JSON (device, versions, date, command, every figure) under bench/results/. The fitted
profile is stored as the device's calibrated profile unless --no-save (SPARSEC_CACHE_DIR chooses
where).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from sparsec.cost_models.accuracy import model_accuracy
from sparsec.cost_models.fit import calibrate, candidate_work, fit_profile, predict
from sparsec.cost_models.linear_measure import linear_grid
from sparsec.cost_models.measure import default_grid, software_versions

RESULTS = Path(__file__).resolve().parent / "results"


def held_out_predictions(report, works) -> np.ndarray:
    """Each layer shape predicted by a profile fitted to the other layer shapes."""
    groups = [m.candidate.group for m in report.measurements]
    measured = np.array([m.seconds for m in report.measurements])
    base = report.fit.profile.replace(**report.fit.before)
    predicted = np.empty(len(groups))
    for group in sorted(set(groups)):
        inside = np.array([g == group for g in groups])
        if inside.all():
            return np.array(report.predicted_after)  # a single group: nothing to hold out
        fitted = fit_profile(base, [w for w, i in zip(works, inside) if not i], measured[~inside]).profile
        predicted[inside] = predict(fitted, [w for w, i in zip(works, inside) if i])
    return predicted


def read_fraction(work) -> float:
    """What the kernels read, as a fraction of the dense work: key tiles (Triton), pairs (CPU executor)."""
    return sum(float(launch.visited.sum()) for launch in work.launches) / work.dense_blocks


def candidate_table(report, held_out, works) -> Table:
    table = Table(title=f"Attention candidates on {report.device}")
    for column in ("layer", "candidate", "density", "read", "measured ms", "before ms", "after ms",
                   "held-out ms"):
        table.add_column(column, justify="left" if column in ("layer", "candidate") else "right")
    rows = zip(report.measurements, report.predicted_before, report.predicted_after, held_out, works)
    for m, before, after, out, work in rows:
        c = m.candidate
        visited = read_fraction(work)
        table.add_row(c.group, c.label, f"{c.density:.2f}", f"{visited:.2f}", f"{m.seconds * 1e3:.2f}",
                      f"{before * 1e3:.2f}", f"{after * 1e3:.2f}", f"{out * 1e3:.2f}")
    return table


def summary_table(accuracies: dict, fit) -> Table:
    table = Table(title="Cost model accuracy")
    for column in ("profile", "Spearman", "mean top-1 regret", "worst top-1 regret"):
        table.add_column(column, justify="left" if column == "profile" else "right")
    for name, acc in accuracies.items():
        table.add_row(name, f"{acc.spearman:.3f}", f"{acc.mean_regret:.1%}", f"{acc.max_regret:.1%}")
    table.caption = (f"rms log error {fit.rms_log_error_before:.3f} -> {fit.rms_log_error_after:.3f}; "
                     + ", ".join(f"{n} {fit.before[n]:.3g} -> {fit.after[n]:.3g}" for n in fit.after))
    return table


def linear_tables(report) -> list[Table]:
    """The linear layers' times, and how well the published and the fitted profile choose."""
    table = Table(title=f"Linear layers on {report.device}")
    for column in ("layer", "kernel", "measured ms", "before ms", "after ms"):
        table.add_column(column, justify="left" if column in ("layer", "kernel") else "right")
    for m, before, after in zip(report.linear_measurements, report.linear_predicted_before,
                                report.linear_predicted_after):
        table.add_row(m.candidate.layer, m.candidate.label, f"{m.seconds * 1e3:.3f}", f"{before * 1e3:.3f}",
                      f"{after * 1e3:.3f}")
    summary = Table(title="Linear layers: the sparse-or-dense choice")
    for column in ("profile", "Spearman", "choice right", "mean loss", "worst loss"):
        summary.add_column(column, justify="left" if column == "profile" else "right")
    for name, acc in (("before (published)", report.linear_accuracy_before),
                      ("after (fitted)", report.linear_accuracy_after)):
        summary.add_row(name, f"{acc.spearman:.3f}", f"{acc.right} of {acc.decisions}", f"{acc.mean_loss:.1%}",
                        f"{acc.max_loss:.1%}")
    return [table, summary]


def linear_json(report) -> dict | None:
    if not report.linear_measurements:
        return None
    rows = zip(report.linear_measurements, report.linear_predicted_before, report.linear_predicted_after)
    return {"accuracy": {"before": report.linear_accuracy_before.as_dict(),
                         "after": report.linear_accuracy_after.as_dict()},
            "candidates": [{"out_features": m.candidate.out_features, "in_features": m.candidate.in_features,
                            "tokens": m.candidate.tokens, "kernel": m.candidate.kernel, "density": m.candidate.density,
                            "dtype": m.candidate.dtype, "measured_s": m.seconds, "samples": m.samples,
                            "predicted_before_s": before, "predicted_after_s": after} for m, before, after in rows]}


def write_json(report, held_out, accuracies, args, command: list[str], path: Path | None) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc)
    device_tag = "cuda" if "cpu:" not in report.device else "cpu"
    path = path or RESULTS / f"cost_model_{device_tag}_{stamp.strftime('%Y%m%d_%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    candidates = []
    for m, before, after, out in zip(report.measurements, report.predicted_before, report.predicted_after, held_out):
        c = m.candidate
        candidates.append({"group": c.group, "decision": c.decision, "family": c.family,
                           "target_density": c.target_density, "density": c.density,
                           "patterns": [p.to_dict() for p in set(c.head_patterns)],
                           "block_m": c.tiles.block_m, "block_n": c.tiles.block_n, "native": c.native,
                           "measured_s": m.seconds, "samples": m.samples, "predicted_before_s": before,
                           "predicted_after_s": after, "predicted_held_out_s": float(out)})
    data = {"benchmark": "cost_model", "device": report.device, "versions": software_versions(),
            "date": stamp.isoformat(), "command": " ".join(command),
            "statistic": args.statistic, "quick": args.quick, "cpu_threads": args.threads,
            "accuracy": {name: acc.as_dict() for name, acc in accuracies.items()},
            "coefficients": {"before": report.fit.before, "after": report.fit.after},
            "rms_log_error": {"before": report.fit.rms_log_error_before, "after": report.fit.rms_log_error_after},
            "fitted_profile": json.loads(report.profile.to_json()), "saved_to": report.saved_to,
            "candidates": candidates, "linear": linear_json(report)}
    path.write_text(json.dumps(data, indent=1))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid (CPU < 1 minute)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--statistic", choices=("median", "min"), default="median",
                        help="CPU: statistic of the repeated runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads while timing (default 1: steady on shared cores)")
    parser.add_argument("--no-save", action="store_true", help="do not store the fitted profile")
    parser.add_argument("--no-linear", action="store_true", help="time and fit attention kernels only")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/...)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    console = Console(width=150)
    candidates = default_grid(device, quick=args.quick)
    linear = [] if args.no_linear else linear_grid(device, quick=args.quick)
    console.print(f"timing {len(candidates)} attention candidates and {len(linear)} linear layers on {device} ...")
    report = calibrate(device, candidates=candidates, linear_candidates=linear, save=not args.no_save,
                       statistic=args.statistic, threads=args.threads if device.type == "cpu" else None)
    works = [candidate_work(m.candidate, report.profile.executor) for m in report.measurements]
    held_out = held_out_predictions(report, works)
    measured = [m.seconds for m in report.measurements]
    decisions = [m.candidate.decision for m in report.measurements]
    accuracies = {"before (published)": report.accuracy_before, "after (fitted)": report.accuracy_after,
                  "held-out layer shapes": model_accuracy(held_out, measured, decisions)}
    console.print(candidate_table(report, held_out, works))
    console.print(summary_table(accuracies, report.fit))
    if linear:
        for table in linear_tables(report):
            console.print(table)
    command = [sys.executable, os.path.relpath(__file__), *argv]
    path = write_json(report, held_out, accuracies, args, command, args.output)
    console.print(f"results: {path}" + (f"; calibrated profile: {report.saved_to}" if report.saved_to else ""))


if __name__ == "__main__":
    main()
