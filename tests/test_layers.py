"""Layering test: which stage of the toolchain may import which.

The installed namespace `aqlm_compile` is assembled from several directories
(pyproject.toml `[tool.setuptools] packages` + `package-dir`, read here, not
hard-coded). Every module is mapped to a stage by its longest name prefix:

    app      aqlm_compile.cli / jobs / __main__ / bench   the top: may import anything
    targets  aqlm_compile.targets                         meets passes and kernels, builds artifacts
    passes   aqlm_compile.passes                          graph rewrites   } siblings: they only
    kernels  aqlm_compile.kernels                         kernel sources   } meet in targets
    runtime  aqlm_compile.runtime                         loads and runs finished artifacts
    core     everything else under aqlm_compile           config, format, export, quantize, ...

RULES lists the forbidden edges, each with its reason. Every import counts:
module level or lazy inside a function, absolute or relative,
`from pkg import submodule`, and `importlib.import_module("literal")`.
Third-party imports are not checked, except that the runtime must not pull in
TVM's compiler (it only needs `tvm.runtime`).
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGES: list[str] = _SETUPTOOLS["packages"]

STAGES = {  # name prefix -> stage; the longest matching prefix wins
    "aqlm_compile": "core",
    "aqlm_compile.runtime": "runtime",
    "aqlm_compile.kernels": "kernels",
    "aqlm_compile.passes": "passes",
    "aqlm_compile.targets": "targets",
    "aqlm_compile.cli": "app", "aqlm_compile.jobs": "app",
    "aqlm_compile.__main__": "app", "aqlm_compile.bench": "app",
}
_LOWER = "a lower stage never imports a higher one"
_SIBLINGS = "passes and kernels are siblings: they meet in targets"
_RUNTIME_CORE = "runtime uses the core only; never the exporter or the compiler"
_RUNTIME_TVM = "runtime loads built artifacts with tvm.runtime; TVM's compiler belongs to targets"
RULES = [  # (importing stage, forbidden stage or dotted module prefix, reason)
    *[("core", s, _LOWER) for s in ("passes", "kernels", "targets", "runtime", "app")],
    *[("passes", s, _SIBLINGS if s == "kernels" else _LOWER) for s in ("kernels", "targets", "runtime", "app")],
    *[("kernels", s, _SIBLINGS if s == "passes" else _LOWER) for s in ("passes", "targets", "runtime", "app")],
    *[("targets", s, _LOWER) for s in ("runtime", "app")],
    *[("runtime", s, _LOWER) for s in ("passes", "kernels", "targets", "app")],
    *[("runtime", m, _RUNTIME_CORE) for m in ("aqlm_compile.export", "aqlm_compile.quantize", "aqlm_compile.nn")],
    *[("runtime", m, _RUNTIME_TVM) for m in ("tvm.relax", "tvm.s_tir", "tvm.target", "tvm.compile")],
]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def package_dir(package: str) -> Path:
    """The directory of a package, by setuptools' rule: the nearest mapped ancestor plus the rest."""
    mapping = _SETUPTOOLS.get("package-dir", {})
    parts = package.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in mapping:
            return ROOT / mapping[key] / Path(*parts[i:])
    return ROOT / Path(*parts)


def tree_modules() -> dict[str, tuple[Path, str]]:
    """module name -> (file, source) for every .py under every listed package's directory."""
    dirs = sorted(((package_dir(p), p) for p in PACKAGES), key=lambda d: -len(d[0].parts))
    modules = {}
    for directory, _ in dirs:
        for path in directory.rglob("*.py"):
            # the deepest package whose directory holds the file owns it
            owner_dir, owner = next((d, p) for d, p in dirs if path.is_relative_to(d))
            rest = path.relative_to(owner_dir).with_suffix("").parts
            name = ".".join((owner, *rest)).removesuffix(".__init__")
            modules[name] = (path, path.read_text())
    return modules


def stage(module: str) -> str | None:
    prefixes = [p for p in STAGES if _under(module, p)]
    return STAGES[max(prefixes, key=len)] if prefixes else None


def imports(module: str, path: Path, source: str, known: set[str]):
    """Yield (line, imported module) for every import in the source, lazy ones included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def absolute(name: str, level: int) -> str:
        if not level:
            return name
        base = package.rsplit(".", level - 1)[0] if level > 1 else package
        return f"{base}.{name}" if name else base

    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.module or "", node.level)
            for a in node.names:
                sub = f"{base}.{a.name}"
                # `from pkg import name`: the submodule if it is one of ours (or third-party)
                is_sub = sub in known or not _under(base, "aqlm_compile")
                yield node.lineno, sub if is_sub and a.name != "*" else base
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            name = node.args[0].value
            yield node.lineno, absolute(name.lstrip("."), len(name) - len(name.lstrip(".")))


def violations(modules: dict[str, tuple[Path, str]]) -> list[str]:
    found = []
    for module, (path, source) in sorted(modules.items()):
        src = stage(module)
        for line, target in imports(module, path, source, set(modules)):
            for rule_src, forbidden, reason in RULES:
                if rule_src != src:
                    continue
                if forbidden in STAGES.values() and stage(target) == forbidden:
                    what = f"stage {forbidden}"
                elif forbidden not in STAGES.values() and _under(target, forbidden):
                    what = forbidden
                else:
                    continue
                rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{module} ({rel}:{line}) imports {target}: "
                             f"stage {src} must not import {what} ({reason})")
    return found


def test_no_forbidden_imports():
    found = violations(tree_modules())
    assert not found, f"{len(found)} forbidden import(s):\n" + "\n".join(found)


def test_checker_catches_a_forbidden_import():
    real = tree_modules()
    config_path, config_source = real["aqlm_compile.config"]
    injected = {
        **real,
        "aqlm_compile.config": (config_path, config_source + "\nfrom aqlm_compile.targets.x86 import build\n"),
        "aqlm_compile.fake_core": (ROOT / "aqlm_compile/fake_core.py",
                                   "def f():\n    import aqlm_compile.passes.pipeline\n"),
        "aqlm_compile.runtime.fake": (ROOT / "aqlm_compile/runtime/fake.py",
                                      "from ..targets import x86\nfrom .. import export\n"
                                      "from tvm.relax.frontend import nn\n"
                                      "import importlib\nimportlib.import_module('aqlm_compile.kernels.dense')\n"),
        "aqlm_compile.kernels.fake": (ROOT / "kernels/fake.py", "from ..passes.pipeline import run_pipeline\n"),
    }
    expected = [
        ("aqlm_compile.config", "aqlm_compile.targets.x86", "stage core must not import stage targets"),
        ("aqlm_compile.fake_core", "aqlm_compile.passes.pipeline", "stage core must not import stage passes"),
        ("aqlm_compile.runtime.fake", "aqlm_compile.targets.x86", "must not import stage targets"),
        ("aqlm_compile.runtime.fake", "aqlm_compile.export", "must not import aqlm_compile.export"),
        ("aqlm_compile.runtime.fake", "tvm.relax.frontend.nn", "must not import tvm.relax"),
        ("aqlm_compile.runtime.fake", "aqlm_compile.kernels.dense", "must not import stage kernels"),
        ("aqlm_compile.kernels.fake", "aqlm_compile.passes.pipeline", "must not import stage passes"),
    ]
    new = sorted(set(violations(injected)) - set(violations(real)))
    for module, target, rule in expected:
        assert any(v.startswith(f"{module} (") and f"imports {target}: " in v and rule in v for v in new), \
            f"{module} -> {target} not reported; new violations:\n" + "\n".join(new)
    assert len(new) == len(expected), "\n".join(new)


def test_stage_mapping_covers_the_tree():
    modules = tree_modules()
    assert modules["aqlm_compile.passes.pipeline"][0] == ROOT / "passes" / "pipeline.py"
    assert modules["aqlm_compile.quantize"][0] == ROOT / "aqlm_compile" / "quantize" / "__init__.py"
    for module, (path, _) in modules.items():
        owner = module if path.name == "__init__.py" else module.rpartition(".")[0]
        assert owner in PACKAGES, f"{path} is not in a package listed in pyproject.toml (not installed)"
        assert stage(module) is not None, f"{module} has no stage"
    assert {stage(m) for m in modules} == set(STAGES.values()), "a stage prefix matches no module"
