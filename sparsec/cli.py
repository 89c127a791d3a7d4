"""The `sparsec` command.

    sparsec dump module:factory [--out DIR] [--options JSON]
        Import `module`, call `factory()` -> (model, example_inputs), compile the model with
        sparsec and write every graph's stages under DIR (default ./sparsec_dump), as
        SPARSEC_DUMP_DIR would; print the explain summary.
        In --options JSON, a pattern is its dict form ({"type": "Window", "left": 64, "right": 0}),
        e.g. '{"attention_patterns": {"blocks.*.attn": {"type": "Window", "left": 4, "right": 0}}}'.
    sparsec demo [--inner eager|inductor]
        Run the tiny DiT demo (sparsec/demo.py).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from sparsec.patterns import from_dict

__all__ = ["main", "load_factory", "parse_cli_options"]


def load_factory(spec: str):
    """The callable named by "package.module:function"."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"sparsec dump: expected module:factory (e.g. tests.models:gpt_sdpa), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"sparsec dump: cannot import module {module_name!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SystemExit(f"sparsec dump: module {module_name!r} has no callable {attr!r}")
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
        options["attention_patterns"] = {k: _patterns_from_json(v) for k, v in options["attention_patterns"].items()}
    return options


def _dump(args: argparse.Namespace) -> int:
    from sparsec.explain import explain

    factory = load_factory(args.factory)
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 2):
        raise SystemExit(f"sparsec dump: {args.factory}() must return (model, example_inputs)")
    model, example_inputs = made
    options = {**parse_cli_options(args.options), "dump_dir": args.out}
    report = explain(model, *example_inputs, options=options)
    print(report.summary())
    print(f"wrote {len(report.graphs)} graph dump(s) to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sparsec.demo import run_demo

    run_demo(inner=args.inner, write=print)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsec", description="sparsec: a sparsity compiler for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    dump = commands.add_parser("dump", help="write every compiled graph's stages of a model to a folder")
    dump.add_argument("factory", help="module:function returning (model, example_inputs)")
    dump.add_argument("--out", default="sparsec_dump", help="output folder (default: ./sparsec_dump)")
    dump.add_argument("--options", default=None, help="backend options as JSON")
    dump.set_defaults(run=_dump)
    demo = commands.add_parser("demo", help="compile the bundled tiny DiT with sparse attention patterns")
    demo.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if "" not in sys.path:
        sys.path.insert(0, "")  # module:factory is usually in the current directory (tests.models)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
