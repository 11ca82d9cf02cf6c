"""The pass pipeline: named phases over an exported program, each optionally followed by a dump of the graph.

Phases, in order:
1. `lower_aqlm_linear` — dequantize + linear → one `aqlm.aqlm_gemm` per AQLM layer (checks configs).
2. `fuse_shared_input` — `aqlm_gemm` nodes reading the same activation (q/k/v, gate/up) → one partitioned node
   (skipped with `fuse=False`).
`--dump-ir DIR` writes `DIR/NN-<phase>.txt` (the FX graph) before the first phase and after each one.
"""

from __future__ import annotations

from pathlib import Path

from aqlm_compile.cache import atomic_write_bytes

from .fuse_shared_input import fuse_shared_input
from .lower_aqlm_linear import cpu_supports, lower_aqlm_linear

PHASES = [
    ("lower_aqlm_linear", lambda ep, opts: lower_aqlm_linear(
        ep, supports=opts.get("supports") or cpu_supports, name_prefix=opts.get("name_prefix", ""))),
    ("fuse_shared_input", lambda ep, opts: fuse_shared_input(ep) if opts.get("fuse", True) else {"skipped": True}),
]


def run_pipeline(ep, dump_ir: str | Path | None = None, **opts) -> dict:
    """Run every phase on `ep` in place; returns {phase: its report}."""
    def dump(index: int, name: str):
        if dump_ir is not None:
            text = ep.graph_module.print_readable(print_output=False)
            atomic_write_bytes(Path(dump_ir) / f"{index:02d}-{name}.txt", text.encode())

    dump(0, "exported")
    report = {}
    for i, (name, phase) in enumerate(PHASES, start=1):
        report[name] = phase(ep, opts)
        dump(i, name)
    return report
