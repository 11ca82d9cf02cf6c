"""`aqlm-compile bench --report [--quick]`: the scoreboard. One run that measures us against dense FP16 and
against llama.cpp on this machine and writes `benchmarks/results/<machine>/report.{json,md}` + PNG plots.

Sections (each recorded, or recorded as skipped with its reason — never silently absent):
- machine: CPU, SIMD flags, cores, memory, copy bandwidth measured now;
- quality: held-out PPL vs file bytes and bits/param for the FP model, our AQLM configs × presets, RTN, and
  llama.cpp's types (imatrix from the same calibration text), all on the same windows (`quality.py`);
- speed: decode and prefill (128 / 512-token prompts) tokens/s and peak RSS of every engine — our artifact in the
  TVM runtime and in ONNX Runtime, the dense model through the same compiler with FP16 and fp32 weights, ORT
  dense fp32, and llama.cpp's `llama-bench` for F16/Q8_0/Q4_0/Q2_K/IQ2 — at all cores and at 1 thread, each
  engine in its own process, rounds interleaved (medians); on the default model and on a synthetic model with
  Llama-2-7B block shapes (random weights; per-token figures also scaled to 32 blocks);
- busy neighbour: the same decode with one nice-19 busy loop running;
- kernels: our GEMV/GEMM vs torch fp32 (MKL), torch bf16 (oneDNN) and the `aqlm` package, same thread count;
- gpu: the records of `bash benchmarks/gpu.sh` when this repository has them.
Everything expensive (checkpoints, artifacts, GGUF files) is cached, so an interrupted report resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import atomic_write_bytes, cache_root
from .machine import machine_info, machine_slug
from .proc import busy_neighbour, child_env, last_json_line, run_measured

SCHEMA_VERSION = 1
LLAMACPP_TYPES = ("F16", "Q8_0", "Q4_0", "Q2_K", "IQ2_XXS")
SPEED_CONFIG = "2x8g8"


@dataclass
class ReportOptions:
    quick: bool = False
    out_dir: Path | None = None                   # default benchmarks/results/<machine> (quick: a temp folder)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    rounds: int = 2
    configs: tuple[str, ...] = ("1x8g8", "2x8g8", "3x8g8", "4x8g8")
    presets: tuple[str, ...] = ("fast",)
    quantize_missing: bool = True                 # quantize configs with no cached checkpoint (18+ min each)
    rtn: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (3, 64), (3, 128), (4, 64), (4, 128))
    llamacpp_types: tuple[str, ...] = LLAMACPP_TYPES
    build_llamacpp: bool = False
    synthetic_blocks: int = 4                     # 0: no 7B-shaped rows
    prompts: tuple[int, ...] = (128, 512)
    # decode steps per measurement (`--decode-tokens`), every engine alike (llama-bench -n); 7B-shaped rows: half.
    # 256 (≈ 1 s at 200 tokens/s): 64-token samples (≈ 0.3 s) spread ±20% round to round on a shared 2-vCPU VM.
    gen: int = 256
    # quality rows are also scored on this corpus, which no preset calibrates on (None: not scored)
    ood_dataset: str | None = "shakespeare"
    # more of our checkpoints for the quality table: (path, embedding form, head form), counted by their artifact's
    # weights
    checkpoints: tuple[tuple[Path, str, str], ...] = ()
    # dense baselines of the default model: FP16 (the mission's) and fp32 (TVM and ORT); quick: FP16 only
    dense_dtype: str = "both"
    onnx_dense: bool = True
    # our artifact also with the lm_head in its other form (TVM route alone): `build` stores a dense head (and a tied
    # embedding) as int8 rows by default, the second engine keeps it as stored (fp16) — what the int8 rows buy. With
    # it, where the default artifact's prompt GEMMs are int8 (`build --prefill int8` on a VNNI CPU), also one with
    # `--prefill fp32` (TVM route alone) — what the int8 prompt GEMMs buy
    head_variant: bool = True
    # the 7B-shaped model also with its lm_head quantized by AQLM in this config (`quantize --head-config`), TVM
    # route alone: the untied 49152×4096 head is half the bytes an int8 head streams per token. Empty: not built.
    # (Its quality cost is a property of the real model: SmolLM2's head in 4x8g8 costs +3.4% Brown PPL,
    # benchmarks/results/amd-epyc-avx2-x86_64-2c/head-forms-ppl.md.)
    synthetic_head_config: str = "4x8g8"
    kernel_shapes: tuple[str, ...] = ("4096x4096", "11008x4096")
    kernel_configs: tuple[str, ...] = ("2x8g8", "1x16g8")
    kernel_batches: tuple[int, ...] = (1, 4, 16)
    windows: int = 32
    seqlen: int = 512
    sections: tuple[str, ...] = ("quality", "speed", "neighbour", "kernels", "gpu")
    readme: Path | None = None                    # README to update (full report only)
    notes: tuple[str, ...] = ()                   # context a person gives the run (--note), kept in report.json

    @classmethod
    def quick_defaults(cls, **kw) -> "ReportOptions":
        base = dict(quick=True, rounds=1, configs=("2x8g8",), presets=("tiny",), rtn=((2, 64), (4, 64)),
                    llamacpp_types=("F16", "Q8_0", "Q4_0"), synthetic_blocks=0, prompts=(16, 64), gen=8,
                    dense_dtype="fp16", onnx_dense=False,
                    kernel_shapes=("576x576",), kernel_configs=("2x8g8",), kernel_batches=(1, 4), windows=4,
                    seqlen=128)
        base.update(kw)
        return cls(**base)


def compiler_fingerprint() -> str:
    """12 hex digits of the sha256 of every source the build reads (core, passes, kernels, targets): a cached
    artifact is reused only if the compiler that built it is this one."""
    import hashlib

    import aqlm_compile
    from aqlm_compile import kernels, passes, targets

    digest = hashlib.sha256()
    roots = [Path(aqlm_compile.__file__).parent, *(Path(m.__file__).parent for m in (passes, kernels, targets))]
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cc", ".h") and p.is_file()
                           and "bench" not in p.relative_to(root).parts and "__pycache__" not in p.parts):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def report_root() -> Path:
    return cache_root() / "report"


@dataclass
class Subject:
    """One model the report measures."""
    tag: str
    label: str
    fp_dir: Path
    blocks: int
    scale_to_blocks: int | None = None
    speed_ckpt: Path | None = None
    artifact: Path | None = None
    artifact_build: dict | None = None
    artifact_head_variant: Path | None = None  # the TVM route with the lm_head in the other form
    artifact_prefill_variant: Path | None = None  # the TVM route with fp32 prompt GEMMs (`build --prefill fp32`)
    # (checkpoint, artifact, head config): the same body with the lm_head quantized by AQLM (TVM route alone)
    aqlm_head_variant: tuple[Path, Path, str] | None = None
    ggufs: dict = field(default_factory=dict)
    gguf_imatrix: bool = False
    notes: list = field(default_factory=list)


class Report:
    def __init__(self, opts: ReportOptions, log=print):
        self.opts, self.log = opts, log
        self.data: dict = {"schema_version": SCHEMA_VERSION, "quick": opts.quick, "threads": opts.threads,
                           "rounds": opts.rounds, "skipped": {}, "notes": list(opts.notes)}
        self.tools = None

    # ---------------------------------------------------------------- preparation (cached)
    def skip(self, what: str, reason: str) -> None:
        self.log(f"skipped {what}: {reason}")
        self.data["skipped"][what] = reason

    def llama_tools(self):
        from . import llamacpp

        try:
            self.tools = llamacpp.tools(build=self.opts.build_llamacpp, log=self.log)
            flags, variant = llamacpp._variant()
            note = f"llama.cpp {llamacpp.LLAMACPP_VERSION}, build variant {variant} ({' '.join(flags)})"
            if note not in self.data["notes"]:
                self.data["notes"].append(note)
        except llamacpp.ToolMissing as exc:
            self.skip("llama.cpp", str(exc))
            self.tools = None
        return self.tools

    def default_subject(self) -> Subject:
        from ..models import default_model_dir

        if not self.opts.quick:
            return Subject("smollm2-135m", "SmolLM2-135M-Instruct", default_model_dir(), blocks=30)
        from .synthetic import make_fp_model

        # quick: a tiny random Llama with SmolLM2's tokenizer (llama.cpp's converter needs a real one)
        fp = make_fp_model(report_root() / "models" / "tiny-llama", 2, default_model_dir(),
                           shapes=dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=512))
        return Subject("tiny-llama", "tiny random Llama (2 blocks, 256 hidden)", fp, blocks=2)

    def synthetic_subject(self) -> Subject:
        from ..models import default_model_dir
        from .synthetic import LLAMA2_7B_BLOCKS, make_fp_model

        n = self.opts.synthetic_blocks
        tag = f"llama2-7b-shapes-{n}blocks"
        self.log(f"synthetic model {tag} (random weights) ...")
        fp = make_fp_model(report_root() / "models" / tag, n, default_model_dir())
        return Subject(tag, f"Llama-2-7B block shapes × {n} (random weights; 49152 vocab, untied head)", fp,
                       blocks=n, scale_to_blocks=LLAMA2_7B_BLOCKS)

    def checkpoint(self, subject: Subject, config: str, preset: str) -> Path | None:
        from .. import format as fmt
        from .checkpoints import checkpoint_path, ensure_checkpoint

        path = checkpoint_path(subject.tag, config, preset)
        if fmt.is_checkpoint(path):
            return path
        if not self.opts.quantize_missing:
            self.skip(f"quality {subject.tag} {config} {preset}", "no cached checkpoint and --no-quantize")
            return None
        return ensure_checkpoint(subject.fp_dir, subject.tag, config, preset, log=self.log)

    def build_artifact(self, subject: Subject, ckpt: Path, dense_dtype: str = "both", onnx_dense: bool = True,
                       head_variant: bool = False):
        """The x86 artifact of `ckpt` as `build` makes it by default, with the dense baselines, built once (in a
        child: its time and RSS recorded). `head_variant`: also the TVM route alone with the lm_head in the other
        form, `--head fp16` beside a default int8 head or `--head int8` beside an fp16 one
        (subject.artifact_head_variant)."""
        art = self._build(subject, ckpt, "x86", ["--dense-model", str(subject.fp_dir), "--dense-dtype", dense_dtype]
                          + ([] if onnx_dense else ["--no-onnx-dense"]))
        if head_variant:  # optional: a failed build is recorded, the main artifact is still measured
            other = "fp16" if artifact_head(art) == "int8" else "int8"
            try:
                subject.artifact_head_variant = self._build(subject, ckpt, f"x86-head-{other}",
                                                            ["--head", other, "--no-onnx"])
            except RuntimeError as exc:
                self.skip(f"{subject.tag} --head {other} artifact", str(exc).splitlines()[0][:300])
            if artifact_int8_prefill(art):
                try:
                    subject.artifact_prefill_variant = self._build(subject, ckpt, "x86-prefill-fp32",
                                                                   ["--prefill", "fp32", "--no-onnx"])
                except RuntimeError as exc:
                    self.skip(f"{subject.tag} --prefill fp32 artifact", str(exc).splitlines()[0][:300])
        subject.artifact = art
        return art

    def build_aqlm_head_variant(self, subject: Subject, head_config: str) -> None:
        """The synthetic subject's body with its lm_head quantized by AQLM in `head_config` (random codes like the
        blocks, as `quantize --head-config` stores it), built for the TVM route alone. Optional: a failure is
        recorded and the other engines are still measured."""
        from .synthetic import make_aqlm_checkpoint

        try:
            ckpt = make_aqlm_checkpoint(subject.fp_dir, report_root() / "checkpoints" /
                                        f"{subject.tag}-{SPEED_CONFIG}-head-{head_config}-random", SPEED_CONFIG,
                                        head_config=head_config)
            art = self._build(subject, ckpt, "x86-aqlm-head", ["--no-onnx"])
        except (RuntimeError, ValueError) as exc:
            self.skip(f"{subject.tag} --head-config {head_config} artifact", str(exc).splitlines()[0][:300])
            return
        subject.aqlm_head_variant = (ckpt, art, head_config)
        subject.notes.append(f"AQLM {head_config} head: the lm_head quantized like the blocks (`quantize --head-config "
                             f"{head_config}`), TVM route alone; what a head config costs in PPL is measured on "
                             "SmolLM2 by benchmarks/head_forms_ppl.py (4x8g8 +3.4% Brown PPL, int8 rows +0.15%)")

    def _build(self, subject: Subject, ckpt: Path, suffix: str, extra: list[str]) -> Path:
        # keyed by the compiler's sources too: an artifact built by an older compiler is not measured as this one
        stem = f"{ckpt.name}-{suffix}"
        art = report_root() / "artifacts" / f"{stem}-{compiler_fingerprint()}"
        record = art.with_name(art.name + ".build.json")
        if not (art / "manifest.json").is_file():
            olds = [*art.parent.glob(f"{stem}-*"), *art.parent.glob(f"{stem}.*"), art.parent / stem]
            for old in olds:  # the same checkpoint's artifacts (and their logs) from other compilers
                # (not another variant's: "…-x86-head-int8-…" also matches "…-x86-*")
                if old.exists() and not old.name.startswith(art.name) and \
                        not any(v in old.name[len(stem):] for v in ("head", "prefill")):
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
            cmd = [sys.executable, "-m", "aqlm_compile.cli", "build", str(ckpt), "--target", "x86", "-o", str(art),
                   *extra]
            self.log(f"building {art.name} ...")
            res = run_measured(cmd, env=child_env(self.opts.threads), log_path=art.with_name(art.name + ".log"))
            if res.returncode != 0:
                raise RuntimeError(f"build of {ckpt} failed (exit {res.returncode}): {res.stderr_tail[-400:]}")
            atomic_write_bytes(record, json.dumps({"wall_s": round(res.wall_s, 1),
                                                   "peak_rss_bytes": res.peak_rss_bytes}).encode())
        if suffix == "x86":
            subject.artifact_build = json.loads(record.read_text()) if record.is_file() else None
        return art

    def ggufs(self, subject: Subject, types, imatrix_chunks: int = 64) -> None:
        """llama.cpp's files of `subject`: converted once (f32 for a trained model, f16 for the random one), an
        importance matrix from our calibration text, then each type (the types it really wrote are read back)."""
        from . import llamacpp

        if self.tools is None:
            return
        root = report_root() / "gguf" / subject.tag
        root.mkdir(parents=True, exist_ok=True)
        base_type = "f16" if subject.scale_to_blocks else "f32"
        base = root / f"{subject.tag}-{base_type.upper()}.gguf"
        t = self.opts.threads
        if not base.is_file():
            self.log(f"llama.cpp: converting {subject.tag} to {base_type} ...")
            llamacpp.convert(subject.fp_dir, base, outtype=base_type)
        imatrix = root / "imatrix.gguf"
        if not imatrix.is_file() and any(q.startswith("IQ") for q in types):
            from ..data import load_corpus

            calib = root / "calibration.txt"
            atomic_write_bytes(calib, load_corpus("brown").calibration.encode())
            self.log(f"llama.cpp: importance matrix over {imatrix_chunks} chunks of our calibration text ...")
            llamacpp.imatrix(self.tools, base, calib, imatrix, chunks=imatrix_chunks, ctx=512, threads=t)
        for qtype in types:
            out = root / f"{subject.tag}-{qtype}.gguf"
            if qtype.lower() == base_type:
                out = base
            elif not out.is_file():
                self.log(f"llama.cpp: quantizing {qtype} ...")
                try:
                    llamacpp.quantize(self.tools, base, out, qtype, imatrix=imatrix if imatrix.is_file() else None,
                                      threads=t)
                except Exception as exc:  # a type llama.cpp refuses here is recorded, the others still run
                    self.skip(f"llama.cpp {subject.tag} {qtype}", str(exc).splitlines()[0][:300])
                    continue
            subject.ggufs[qtype] = out
        subject.gguf_imatrix = imatrix.is_file()

    # ---------------------------------------------------------------- sections
    def quality(self, subject: Subject) -> None:
        from . import quality as q
        from .checkpoints import run_record

        win = q.Windows(subject.fp_dir, "brown", self.opts.seqlen, self.opts.windows)
        ood = (q.Windows(subject.fp_dir, self.opts.ood_dataset, self.opts.seqlen, self.opts.windows)
               if self.opts.ood_dataset else None)
        rows = []
        self.log("quality: FP ...")
        rows.append(q.fp_row(win, subject.fp_dir, ood))
        for preset in self.opts.presets:
            for config in self.opts.configs:
                ckpt = self.checkpoint(subject, config, preset)
                if ckpt is None:
                    continue
                self.log(f"quality: {config} {preset} ...")
                rows.append(q.aqlm_row(win, ckpt, preset, run_record(ckpt), ood))
        for ckpt, embedding, head in self.opts.checkpoints:
            self.log(f"quality: {ckpt.name} (embedding {embedding}, head {head}) ...")
            meta = json.loads((ckpt / "config.json").read_text()).get("aqlm_compile", {})
            rows.append(q.aqlm_row(win, ckpt, meta.get("preset", "?"), None, ood, embedding=embedding, head=head))
        for nbits, gs in self.opts.rtn:
            self.log(f"quality: RTN {nbits}-bit g{gs} ...")
            rows.append(q.rtn_row(win, subject.fp_dir, nbits, gs, ood))
        for qtype, path in subject.ggufs.items():
            self.log(f"quality: llama.cpp {qtype} ...")
            try:
                rows.append(q.llamacpp_row(win, subject.fp_dir, path, qtype, subject.gguf_imatrix, ood))
            except Exception as exc:
                self.skip(f"quality llama.cpp {qtype}", str(exc).splitlines()[0][:300])
        self.data["quality"] = {"model": subject.label, "protocol": win.spec, "rows": rows,
                                **({"ood_protocol": ood.spec} if ood is not None else {})}

    def engines(self, subject: Subject) -> list[dict]:
        art = subject.artifact
        manifest = json.loads((art / "manifest.json").read_text())
        files = manifest["files"]
        size = lambda *names: sum(files[n]["bytes"] for n in names if n in files)  # noqa: E731
        tvm = manifest.get("tvm", {})
        onnx = manifest.get("onnx", {})
        cfg = manifest["aqlm_config"]
        tied = json.loads((subject.fp_dir / "config.json").read_text()).get("tie_word_embeddings", False)

        def ours(head: str) -> tuple[str, str]:  # (engine name stem, weights) of our artifact with this head form
            if head == "int8":
                return (f"aqlm-compile {cfg} + int8 head",
                        f"AQLM {cfg} + int8 {'embedding/head (tied)' if tied else 'head, fp16 embedding'}")
            return f"aqlm-compile {cfg}", f"AQLM {cfg} + fp16 embedding/head"

        out = []
        head = artifact_head(art)  # both routes store the head alike (targets/plan.py export_graphs)
        if tvm:
            stem, weights = ours(head)
            out.append({"engine": f"{stem}, TVM runtime", "family": "aqlm-compile", "runtime": "tvm",
                        "kind": "aqlm", "weights": weights, "file_bytes": size(tvm["library"], tvm["params"])})
        if subject.artifact_head_variant is not None:
            stem, weights = ours(artifact_head(subject.artifact_head_variant))
            out.append({"engine": f"{stem}, TVM runtime", "family": "aqlm-compile", "runtime": "tvm", "kind": "aqlm",
                        "weights": weights, "file_bytes": tvm_route_bytes(subject.artifact_head_variant),
                        "artifact": str(subject.artifact_head_variant)})
        if subject.artifact_prefill_variant is not None:
            stem, weights = ours(artifact_head(subject.artifact_prefill_variant))
            out.append({"engine": f"{stem}, TVM runtime, fp32 prompt GEMMs", "family": "aqlm-compile",
                        "runtime": "tvm", "kind": "aqlm", "weights": weights,
                        "file_bytes": tvm_route_bytes(subject.artifact_prefill_variant),
                        "artifact": str(subject.artifact_prefill_variant)})
        if subject.aqlm_head_variant is not None:
            ckpt, variant, hc = subject.aqlm_head_variant
            out.append({"engine": f"aqlm-compile {cfg} + AQLM {hc} head, TVM runtime", "family": "aqlm-compile",
                        "runtime": "tvm", "kind": "aqlm", "weights": f"AQLM {cfg} + AQLM {hc} head, fp16 embedding",
                        "file_bytes": tvm_route_bytes(variant), "artifact": str(variant), "checkpoint": str(ckpt)})
        if onnx:
            ort_files = [onnx["model"], onnx["op_library"], manifest["kernel_library"]] + \
                [n for n in files if n.startswith("onnx/") and n.endswith(".data") and "dense" not in n]
            stem, weights = ours(head)
            out.append({"engine": f"{stem}, ONNX Runtime + op library", "family": "aqlm-compile",
                        "runtime": "ort", "kind": "aqlm", "weights": weights, "file_bytes": size(*ort_files)})
        if "dense_fp16" in tvm:
            d = tvm["dense_fp16"]
            out.append({"engine": "dense FP16 weights, same compiler (TVM runtime)", "family": "dense",
                        "runtime": "tvm", "kind": "dense_fp16", "weights": "fp16 (fp32 compute)",
                        "file_bytes": size(d["library"], d["params"])})
        if "dense" in tvm:
            d = tvm["dense"]
            out.append({"engine": "dense fp32, same compiler (TVM runtime)", "family": "dense", "runtime": "tvm",
                        "kind": "dense", "weights": "fp32", "file_bytes": size(d["library"], d["params"])})
        if "dense" in onnx:
            out.append({"engine": "dense fp32, ONNX Runtime", "family": "dense", "runtime": "ort", "kind": "dense",
                        "weights": "fp32", "file_bytes": size(onnx["dense"], *[n for n in files
                                                                              if n.startswith("onnx/model.dense")])})
        for qtype, path in subject.ggufs.items():
            out.append({"engine": f"llama.cpp {qtype}", "family": "llama.cpp", "runtime": "llama-bench",
                        "kind": qtype, "weights": qtype, "file_bytes": path.stat().st_size, "gguf": str(path)})
        for e in out:
            e["model"] = subject.tag
        return out

    def run_engine(self, subject: Subject, engine: dict, threads: int, prompts, gen: int) -> dict:
        """One measurement of one engine in its own process."""
        if engine["family"] == "llama.cpp":
            from . import llamacpp

            r = llamacpp.bench(self.tools, Path(engine["gguf"]), threads, prompts=tuple(prompts), gen=gen, reps=1)
            return {"decode_tokens_per_s": r["decode_tokens_per_s"],
                    "prefill_tokens_per_s": {str(k): v for k, v in r["prefill_tokens_per_s"].items()},
                    "peak_rss_bytes": r["peak_rss_bytes"]}
        cmd = [sys.executable, "-m", "aqlm_compile.bench.speed", engine.get("artifact", str(subject.artifact)),
               "--runtime", engine["runtime"], "--kind", engine["kind"], "--threads", str(threads),
               "--prompts", ",".join(str(p) for p in prompts), "--gen", str(gen), "--reps", "1"]
        res = run_measured(cmd, env=child_env(threads), timeout=1800)
        if res.returncode != 0:
            raise RuntimeError(f"{engine['engine']}: exit {res.returncode}: {res.stderr_tail.strip()[-300:]}")
        r = last_json_line(res.stdout)
        return {"decode_tokens_per_s": r["decode_tokens_per_s"], "prefill_tokens_per_s": r["prefill_tokens_per_s"],
                "peak_rss_bytes": max(res.peak_rss_bytes, r.get("peak_rss_bytes", 0)), "load_s": r["load_s"]}

    def speed(self, subjects: list[Subject], neighbour: bool, full: bool = True) -> None:
        """Every engine × thread count, rounds interleaved; then (neighbour) decode with a busy neighbour.
        `full` False (`--sections neighbour` alone): only the idle and busy decode at all cores, interleaved."""
        thread_counts = sorted({self.opts.threads, 1}, reverse=True) if full else [self.opts.threads]
        prompts = self.opts.prompts if full else ()
        plans = []
        for s in subjects:
            gen = self.opts.gen if not s.scale_to_blocks else max(16, self.opts.gen // 2)
            for e in self.engines(s):
                for t in thread_counts:
                    plans.append((s, e, t, "idle", prompts, gen))
                if neighbour:
                    plans.append((s, e, self.opts.threads, "busy neighbour (nice 19 loop, low-priority group)", (),
                                  gen))
        runs: dict[int, list] = {i: [] for i in range(len(plans))}
        errors: dict[int, str] = {}
        for rnd in range(self.opts.rounds):
            for i, (s, e, t, cond, prompts, gen) in enumerate(plans):
                if i in errors:
                    continue
                self.log(f"speed round {rnd + 1}/{self.opts.rounds}: {s.tag} | {e['engine']} | {t} thread(s) | "
                         f"{cond}")
                time.sleep(0.5)  # the previous child's threads are gone; let the cores settle
                try:
                    with busy_neighbour(cond != "idle"):
                        runs[i].append(self.run_engine(s, e, t, prompts, gen))
                except Exception as exc:
                    errors[i] = str(exc).splitlines()[0][:300]
                    self.log(f"  failed: {errors[i]}")
        rows = []
        for i, (s, e, t, cond, prompts, gen) in enumerate(plans):
            row = {**e, "threads": t, "condition": cond, "decode_tokens": gen,
                   "prompt_lengths": list(prompts), "rounds": runs[i]}
            if i in errors:
                row["error"] = errors[i]
            if runs[i]:
                row["decode_tokens_per_s"] = statistics.median(r["decode_tokens_per_s"] for r in runs[i])
                row["prefill_tokens_per_s"] = {str(p): statistics.median(r["prefill_tokens_per_s"][str(p)]
                                                                         for r in runs[i]) for p in prompts}
                row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs[i])
                if s.scale_to_blocks:
                    row.update(self._scaled(s, e, row))
            rows.append(row)
        self.data["speed"] = {"subjects": [self._subject_json(s) for s in subjects], "rows": rows,
                              "method": "each engine in its own process; rounds interleaved across engines; "
                                        "median over rounds; decode = tokens/s of "
                                        f"{self.opts.gen} single-token steps after a 1-token prompt "
                                        f"({max(16, self.opts.gen // 2)} for a 7B-shaped model); prefill = prompt "
                                        "tokens / time of one call from an empty cache; peak RSS of the engine's "
                                        "process"}

    def _subject_json(self, s: Subject) -> dict:
        return {"tag": s.tag, "label": s.label, "blocks": s.blocks, "scale_to_blocks": s.scale_to_blocks,
                "artifact_build": s.artifact_build, "gguf_imatrix": s.gguf_imatrix, "notes": s.notes}

    def _scaled(self, s: Subject, e: dict, row: dict) -> dict:
        """Per-token time scaled from `s.blocks` to `s.scale_to_blocks` blocks: decode by the bytes it streams
        (block weights × blocks + head), prefill by the block count (compute in the blocks dominates)."""
        block_b, head_b = _bytes_split(s, e)
        n, big = s.blocks, s.scale_to_blocks
        factor = (block_b * big / n + head_b) / (block_b + head_b)
        return {"scaled_to_blocks": big, "scaled_decode_tokens_per_s": row["decode_tokens_per_s"] / factor,
                "scaled_prefill_tokens_per_s": {k: v * n / big for k, v in row["prefill_tokens_per_s"].items()},
                "scaling": {"block_bytes": block_b, "head_bytes": head_b, "decode_time_factor": factor}}

    def kernels(self) -> None:
        o = self.opts
        cmd = [sys.executable, "-m", "aqlm_compile.cli", "bench", "--kernels", "--shapes", ",".join(o.kernel_shapes),
               "--configs", ",".join(o.kernel_configs), "--batch", ",".join(map(str, o.kernel_batches)),
               "--rounds", "3" if not o.quick else "1", "--threads", str(o.threads), "--bf16", "--json"]
        self.log("kernels: ours vs torch fp32 (MKL), torch bf16 (oneDNN) and the aqlm package ...")
        res = run_measured(cmd, env=child_env(o.threads), timeout=3600)
        if res.returncode != 0:
            self.skip("kernels", f"exit {res.returncode}: {res.stderr_tail.strip()[-300:]}")
            return
        records = json.loads(res.stdout.strip().splitlines()[-1])
        self.data["kernels"] = {"threads": o.threads, "records": records}

    def gpu(self, results_root: Path) -> None:
        found = sorted(results_root.glob("*/gpu.json"))
        if not found:
            self.skip("gpu", "no GPU results in this repository: run `bash benchmarks/gpu.sh` on a machine with an "
                             "NVIDIA GPU (none was available for this report)")
            return
        self.data["gpu"] = {"source": [str(p.relative_to(results_root.parent.parent)) for p in found],
                            "results": [json.loads(p.read_text()) for p in found]}

    # ---------------------------------------------------------------- the run
    def run(self) -> dict:
        o = self.opts
        t0 = time.perf_counter()
        self.log(f"report ({'quick' if o.quick else 'full'}): {o.threads} threads, {o.rounds} round(s)")
        self.data["machine"] = machine_info()
        self.llama_tools()
        main = self.default_subject()
        subjects = [main]
        if any(sec in o.sections for sec in ("speed", "neighbour")):
            preset = o.presets[0]
            main.speed_ckpt = self.checkpoint(main, SPEED_CONFIG, preset)
            if main.speed_ckpt is not None:
                self.build_artifact(main, main.speed_ckpt, dense_dtype=o.dense_dtype, onnx_dense=o.onnx_dense,
                                    head_variant=o.head_variant)
        self.ggufs(main, o.llamacpp_types, imatrix_chunks=64 if not o.quick else 4)
        if "quality" in o.sections:
            self.quality(main)
        if o.synthetic_blocks and any(sec in o.sections for sec in ("speed", "neighbour")):
            from .synthetic import make_aqlm_checkpoint

            syn = self.synthetic_subject()
            ckpt = make_aqlm_checkpoint(syn.fp_dir, report_root() / "checkpoints" / f"{syn.tag}-{SPEED_CONFIG}-random",
                                        SPEED_CONFIG)
            syn.speed_ckpt = ckpt
            # fp16 dense only (the FP16 baseline); an fp32 ONNX file of this size passes protobuf's 2 GB limit
            self.build_artifact(syn, ckpt, dense_dtype="fp16", onnx_dense=False, head_variant=o.head_variant)
            if o.synthetic_head_config:
                self.build_aqlm_head_variant(syn, o.synthetic_head_config)
            syn.notes.append("dense fp32 (TVM and ORT) not built at this size: the FP16 baseline is the mission's, "
                             "and an fp32 ONNX file passes protobuf's 2 GB limit")
            self.ggufs(syn, o.llamacpp_types, imatrix_chunks=8)
            syn.notes.append("imatrix over 8 chunks (weights are random: speed only)")
            subjects.append(syn)
        if "speed" in o.sections or "neighbour" in o.sections:
            subjects = [s for s in subjects if s.artifact is not None]
            self.speed(subjects, neighbour="neighbour" in o.sections, full="speed" in o.sections)
        if "kernels" in o.sections:
            self.kernels()
        self.data["wall_s"] = round(time.perf_counter() - t0, 1)
        import shlex

        argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("aqlm-compile", "cli.py")) else None
        self.data["command"] = ("aqlm-compile " + shlex.join(argv) if argv and argv[0] == "bench" else
                                "aqlm-compile bench --report" + (" --quick" if o.quick else ""))
        self.data["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        return self.data


def _bytes_split(s: Subject, e: dict) -> tuple[int, int]:
    """(bytes of all blocks, bytes of the head read per token) of one engine's weights."""
    import gguf
    from safetensors import safe_open

    if e["family"] == "llama.cpp":
        blocks = head = 0
        for t in gguf.GGUFReader(str(e["gguf"])).tensors:
            if t.name.startswith("blk."):
                blocks += int(t.n_bytes)
            elif t.name == "output.weight":
                head += int(t.n_bytes)
        return blocks, head
    path = (Path(e.get("checkpoint") or s.speed_ckpt) if e["kind"] == "aqlm" else s.fp_dir) / "model.safetensors"
    scale = 2 if e["kind"] == "dense" else 1  # fp32 weights from the fp16 FP model file
    blocks = head = 0
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            nbytes = 1
            for d in sl.get_shape():
                nbytes *= d
            nbytes *= {"F16": 2, "BF16": 2, "F32": 4, "I8": 1, "I16": 2, "I32": 4, "I64": 8}[sl.get_dtype()]
            if ".layers." in name:
                blocks += nbytes * (scale if "codes" not in name else 1)
            elif name.startswith("lm_head"):
                shape = sl.get_shape()
                if "+ int8 head" in e["engine"] and name.endswith(".weight") and len(shape) == 2:
                    nbytes = shape[0] * (shape[1] + 4)  # int8 rows and an fp32 scale per row
                head += nbytes * scale
    return blocks, head


def tvm_route_bytes(art: Path) -> int:
    """Bytes of an artifact's TVM route as its manifest lists them: the model library and its params."""
    manifest = json.loads((Path(art) / "manifest.json").read_text())
    return sum(manifest["files"][n]["bytes"] for n in (manifest["tvm"]["library"], manifest["tvm"]["params"]))


def artifact_head(art: Path) -> str:
    """The lm_head form an artifact's manifest records (targets/plan.py: "int8 rows, ..." or "fp16 (as stored)")."""
    from ..artifact import head_form

    return head_form(json.loads((Path(art) / "manifest.json").read_text()))


def artifact_int8_prefill(art: Path) -> bool:
    """Whether an artifact's prompt GEMMs are int8 (`build --prefill int8` where the CPU has VNNI: the kernels its
    manifest records)."""
    from ..artifact import relax_kernel_counts

    return any(k.startswith("gemm_vnni") for k in relax_kernel_counts(json.loads((Path(art) / "manifest.json").read_text())))


def default_out_dir(info: dict) -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results" / machine_slug(info)


def run_report(opts: ReportOptions, log=print) -> Path:
    """Measure, then write report.json, report.md and the plots (and the README block) atomically."""
    from .render import render_all

    report = Report(opts, log)
    data = report.run()
    out = Path(opts.out_dir) if opts.out_dir else default_out_dir(data["machine"])
    if "gpu" in opts.sections:
        report.gpu(default_out_dir(data["machine"]).parent)
    out.mkdir(parents=True, exist_ok=True)
    from .records import check_report

    check_report(data)
    atomic_write_bytes(out / "report.json", (json.dumps(data, indent=1) + "\n").encode())
    render_all(out / "report.json", readme=opts.readme)
    log(f"wrote {out / 'report.json'}, report.md and plots in {data['wall_s']:.0f} s")
    return out
