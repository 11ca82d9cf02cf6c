"""The pass pipeline: named phases over an exported program, each optionally followed by a dump of the graph.

Phases, in order:
1. `lower_aqlm_linear` — dequantize + linear → one `aqlm.aqlm_gemm` per AQLM layer (checks configs against
   `supports`, which the build plan takes from the target's kernel table).
2. `fuse_shared_input` — `aqlm_gemm` nodes reading the same activation (q/k/v, gate/up) → one partitioned node
   (skipped with `fuse=False`: the Relax route with `build --no-fuse-tvm`, and by default on arm64).
3. `fold_parameter_cats` — the parameter cats of the fused layers → one parameter each (with `fold_cats=True`: the
   Relax route when it fuses, the x86 default or `build --fuse-tvm`; its functions take parameters as inputs and
   would otherwise concatenate them on every call).
`dump_ir=DIR` writes `DIR/NN-<phase>.txt` (the FX graph) before the first phase and after each one.

Where: the build plan (targets/plan.py) sequences export (aqlm_compile/export.py) → this pipeline → the routes; the
exporter never calls it. A route chooses phases through the options, not by assembling its own recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aqlm_compile.cache import atomic_write_bytes

from .fold_parameter_cats import fold_parameter_cats
from .fuse_shared_input import fuse_shared_input
from .lower_aqlm_linear import lower_aqlm_linear


@dataclass(frozen=True)
class PipelineOptions:
    supports: Callable | None = None  # config -> bool (None: every config; the build plan passes the target's)
    name_prefix: str = ""  # stripped from layer names in reports and errors (the export wrapper's attribute)
    fuse: bool = True
    fold_cats: bool = False


PHASES = [
    ("lower_aqlm_linear", lambda ep, o: lower_aqlm_linear(
        ep, supports=o.supports or (lambda config: True), name_prefix=o.name_prefix)),
    ("fuse_shared_input", lambda ep, o: fuse_shared_input(ep) if o.fuse else {"skipped": True}),
    ("fold_parameter_cats", lambda ep, o: fold_parameter_cats(ep) if o.fold_cats else {"skipped": True}),
]


def run_pipeline(ep, dump_ir: str | Path | None = None, options: PipelineOptions | None = None, **opts) -> dict:
    """Run every phase on `ep` in place; returns {phase: its report}. `opts`: PipelineOptions fields."""
    options = options or PipelineOptions(**opts)

    def dump(index: int, name: str):
        if dump_ir is not None:
            text = ep.graph_module.print_readable(print_output=False)
            atomic_write_bytes(Path(dump_ir) / f"{index:02d}-{name}.txt", text.encode())

    dump(0, "exported")
    report = {}
    for i, (name, phase) in enumerate(PHASES, start=1):
        report[name] = phase(ep, options)
        dump(i, name)
    return report
