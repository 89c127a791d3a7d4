"""What sparsec did to each compiled graph, as a record; written to SPARSEC_DUMP_DIR and kept
for sparsec.explain.

For every graph the backend compiles it fills one GraphRecord: the Dynamo FX graph that came in,
the ATen graph, the IR after each named stage, the rewritten FX graph, and, when sparsec fell
back, why. With a dump directory, `write_record` writes it as a numbered folder:

    <dump_dir>/003_graph_3/
        0_dynamo_fx.py        the FX graph Dynamo handed to the backend (code)
        1_aten_fx.py          the aot_autograd ATen graph sparsec lowered
        2_ir_lower.txt        the IR after each stage, in pipeline order; parse_graph reads it back
        3_ir_apply_patterns.txt   (then 4_ir_analyze_weights.txt, 5_ir_choose_linear_kernels.txt, ...)
        6_rewritten_fx.py     the ATen graph with sparsec custom-op calls, as compiled
        plan.json, plan.txt   only with the option "tune": the plan tuned for this graph
        fallback.txt          only when sparsec fell back: the reason

`recording()` collects the records of the graphs compiled inside it (sparsec.explain uses it).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsec.ir.graph import Graph

__all__ = ["GraphRecord", "write_record", "recording", "publish", "next_graph_index"]

log = logging.getLogger(__name__)

_counter = itertools.count()
_local = threading.local()


def next_graph_index() -> int:
    """A process-wide number for each graph the backend sees."""
    return next(_counter)


@dataclass
class GraphRecord:
    """Everything sparsec produced for one compiled graph."""

    index: int
    name: str
    dynamo_code: str
    aten_code: str = ""
    stages: list[tuple[str, Graph]] = field(default_factory=list)
    rewritten_code: str = ""
    inner: str = "inductor"
    fallback_reason: str | None = None
    plan: Any = None                    # the sparsec.Plan tuned for this graph (option "tune")
    unmatched_attention: list = field(default_factory=list)  # match_attention.Unmatched: left as written

    @property
    def final_ir(self) -> Graph | None:
        return self.stages[-1][1] if self.stages else None

    def stage(self, name: str) -> Graph:
        """The IR after stage `name`."""
        for stage_name, graph in self.stages:
            if stage_name == name:
                return graph
        raise KeyError(f"graph {self.name} has no stage {name!r}; stages: {[n for n, _ in self.stages]}")

    def files(self) -> dict[str, str]:
        """File name -> content, in the order written."""
        files = {"0_dynamo_fx.py": self.dynamo_code}
        if self.aten_code:
            files["1_aten_fx.py"] = self.aten_code
        for offset, (stage_name, graph) in enumerate(self.stages):
            files[f"{2 + offset}_ir_{stage_name}.txt"] = str(graph)
        if self.rewritten_code:
            files[f"{2 + len(self.stages)}_rewritten_fx.py"] = self.rewritten_code
        if self.plan is not None:
            files["plan.json"] = self.plan.to_json() + "\n"
            files["plan.txt"] = str(self.plan) + "\n"
        if self.fallback_reason:
            files["fallback.txt"] = self.fallback_reason + "\n"
        return files


def _free_folder(root: Path, record: GraphRecord) -> Path:
    """A new numbered folder: numbering continues after what the directory already holds."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.split("_", 1)[0]) for p in root.iterdir() if p.is_dir() and p.name.split("_", 1)[0].isdigit()]
    number = max(taken, default=-1) + 1
    while True:
        folder = root / f"{number:03d}_{record.name}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # another process took it
            number += 1


def write_record(record: GraphRecord, dump_dir: str | os.PathLike) -> Path:
    """Write `record` as a numbered folder under `dump_dir`; return the folder."""
    folder = _free_folder(Path(dump_dir), record)
    for name, content in record.files().items():
        (folder / name).write_text(content)
    log.info("sparsec dumped graph %s to %s", record.name, folder)
    return folder


@contextlib.contextmanager
def recording() -> Iterator[list[GraphRecord]]:
    """Collect the GraphRecords of graphs compiled inside the block (nesting allowed)."""
    records: list[GraphRecord] = []
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(records)
    try:
        yield records
    finally:
        stack.remove(records)


def publish(record: GraphRecord, dump_dir: str | None) -> None:
    """Hand a finished record to the active recorders and, if set, the dump directory."""
    for records in getattr(_local, "stack", []):
        records.append(record)
    if dump_dir:
        try:
            write_record(record, dump_dir)
        except OSError as e:  # a dump must never break compilation
            log.warning("sparsec could not write the dump of graph %s to %s: %s", record.name, dump_dir, e)
