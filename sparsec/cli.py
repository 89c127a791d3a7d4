"""The `sparsec` command.

    sparsec dump module:factory [--out DIR] [--options JSON]
        Import `module`, call `factory()` -> (model, example_inputs), compile the model with
        sparsec and write every graph's stages under DIR (default ./sparsec_dump), as
        SPARSEC_DUMP_DIR would; print the explain summary.
        In --options JSON, a pattern is its dict form ({"type": "Window", "left": 64, "right": 0}),
        e.g. '{"attention_patterns": {"blocks.*.attn": {"type": "Window", "left": 4, "right": 0}}}'.
    sparsec tune module:factory [--target h100] [--budget 0.02] [--out plan.json] [--plot plan.png]
                 [--measure [--quick-measure]]
        Tune the factory's model on its example inputs (sparsec.tune, with a progress bar), print
        the plan's table and save it. --measure first calibrates the cost model on this machine's
        device (cost_models.fit.calibrate: time candidate attention kernels and linear layers, fit,
        store the profile, which the compiler's choices then use) and tunes for that device
        instead of --target; --quick-measure times the small grids.
    sparsec demo [--inner eager|inductor] [--no-tune]
        Run the tiny DiT demo (sparsec/demo.py), then tune the model with positional heads and
        run it with the plan (--no-tune: skip that part).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from sparsec.patterns import from_dict

__all__ = ["main", "load_factory", "parse_cli_options"]


def load_factory(spec: str, command: str = "dump"):
    """The callable named by "package.module:function" (errors name `command`)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"sparsec {command}: expected module:factory (e.g. tests.models:gpt_sdpa), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"sparsec {command}: cannot import module {module_name!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SystemExit(f"sparsec {command}: module {module_name!r} has no callable {attr!r}")
    return factory


def _patterns_from_json(value: Any) -> Any:
    if isinstance(value, dict):
        return from_dict(value)
    if isinstance(value, list):
        return [from_dict(v) for v in value]
    return value  # parse_options names the problem


def parse_cli_options(text: str | None) -> dict[str, Any]:
    """The --options JSON as backend options (pattern dicts become Patterns)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"sparsec: --options is not valid JSON: {e}") from None
    if not isinstance(options, dict):
        raise SystemExit("sparsec: --options must be a JSON object")
    if isinstance(options.get("attention_patterns"), dict):
        try:
            options["attention_patterns"] = {k: _patterns_from_json(v)
                                             for k, v in options["attention_patterns"].items()}
        except (TypeError, ValueError) as e:
            raise SystemExit(f"sparsec: --options attention_patterns: {e}") from None
    return options


def _model_and_inputs(spec: str, command: str):
    """(model, example inputs as a tuple: a lone tensor is one input, as sparsec.tune takes it)."""
    from sparsec.model_tuning import as_inputs

    made = load_factory(spec, command)()
    if not (isinstance(made, tuple) and len(made) == 2):
        raise SystemExit(f"sparsec {command}: {spec}() must return (model, example_inputs)")
    try:
        return made[0], as_inputs(made[1])
    except TypeError as e:
        raise SystemExit(f"sparsec {command}: {spec}(): {e}") from None


def _check_out_folder(path: str, command: str, flag: str) -> None:
    """Before the work: the folder a file is to be written in exists."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"sparsec {command}: {flag} {path!r}: folder {folder!r} does not exist")


def _tune(args: argparse.Namespace) -> int:
    from sparsec.model_tuning import tune

    if args.quick_measure and not args.measure:
        raise SystemExit("sparsec tune: --quick-measure only applies with --measure")
    _check_out_folder(args.out, "tune", "--out")
    if args.plot:
        _check_out_folder(args.plot, "tune", "--plot")
    model, example_inputs = _model_and_inputs(args.factory, "tune")
    target = args.target
    if args.measure:
        from sparsec.cost_models.fit import calibrate

        report = calibrate(quick=args.quick_measure)
        target = report.fit.profile.name
        print(f"calibrated the cost model on {report.device}: {report.summary()}; saved to {report.saved_to}")
    try:
        plan = tune(model, example_inputs, target=target, budget=args.budget, progress=True)
    except ValueError as e:
        raise SystemExit(f"sparsec tune: {e}") from None
    print(plan)
    plan.save(args.out)
    print(f"saved the plan to {args.out}")
    if args.plot:
        plan.plot(args.plot)
        print(f"saved the plot to {args.plot}")
    return 0


def _dump(args: argparse.Namespace) -> int:
    from sparsec.config import parse_options
    from sparsec.explain import explain

    options = {**parse_cli_options(args.options), "dump_dir": args.out}
    try:
        parse_options(options)  # a bad option is the user's: said before the model is built
    except (TypeError, ValueError) as e:
        raise SystemExit(f"sparsec dump: --options: {e}") from None
    model, example_inputs = _model_and_inputs(args.factory, "dump")
    report = explain(model, *example_inputs, options=options)
    print(report.summary())
    print(f"wrote {len(report.graphs)} graph dump(s) to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sparsec.demo import run_demo, run_tuned_demo

    run_demo(inner=args.inner, write=print)
    if not args.no_tune:
        run_tuned_demo(inner=args.inner, write=print)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsec", description="sparsec: a sparsity compiler for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    dump = commands.add_parser("dump", help="write every compiled graph's stages of a model to a folder")
    dump.add_argument("factory", help="module:function returning (model, example_inputs)")
    dump.add_argument("--out", default="sparsec_dump", help="output folder (default: ./sparsec_dump)")
    dump.add_argument("--options", default=None, help="backend options as JSON")
    dump.set_defaults(run=_dump)
    tune = commands.add_parser("tune", help="tune a model's attention patterns into a plan (sparsec.tune)")
    tune.add_argument("factory", help="module:function returning (model, example_inputs)")
    tune.add_argument("--target", default="h100", help="hardware the plan is for: h100, h200, a100 or cpu (default h100)")
    tune.add_argument("--budget", type=float, default=0.02, help="per-layer relative error budget (default 0.02)")
    tune.add_argument("--out", default="plan.json", help="where to save the plan (default ./plan.json)")
    tune.add_argument("--plot", default=None, help="also save a plot of the plan (PNG; needs matplotlib)")
    tune.add_argument("--measure", action="store_true",
                      help="calibrate the cost model on this machine's device first and tune for it")
    tune.add_argument("--quick-measure", action="store_true", help="with --measure: a small candidate grid")
    tune.set_defaults(run=_tune)
    demo = commands.add_parser("demo", help="compile the bundled tiny DiT with sparse attention patterns")
    demo.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    demo.add_argument("--no-tune", action="store_true", help="skip tuning the model with positional heads")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if "" not in sys.path:
        sys.path.insert(0, "")  # module:factory is usually in the current directory (tests.models)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
