"""Which script writes which result file under benchmarks/results/, and the fields it writes.

Every figure in the repository comes from a script; a field that no script writes (a hand-typed number) is refused:
`report.py` checks its record against these sets before writing, and tests/bench/test_records.py checks every
committed result file against them. Adding a field to a writer means adding it here.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

MACHINE = {"cpu", "arch", "cores", "memory_bytes", "simd_flags", "os", "python", "memory_bandwidth_gbs"}
QUALITY_ROW = {"family", "name", "config", "preset", "nbits", "group_size", "qtype", "ppl", "params", "linear_params",
               "file_bytes", "bytes_kind", "bits_per_param_linears", "bits_per_param_all", "types_written", "imatrix",
               "eval_s", "quantize_wall_s", "quantize_peak_rss_bytes", "quantize_cpu_s",
               "quantize_loadavg_after", "ppl_ood", "embedding", "head", "head_config", "linears_per_config"}
SPEED_ROW = {"model", "engine", "family", "runtime", "kind", "weights", "file_bytes", "gguf", "artifact", "checkpoint",
             "threads",
             "condition",
             "decode_tokens", "prompt_lengths", "rounds", "error", "decode_tokens_per_s", "prefill_tokens_per_s",
             "peak_rss_bytes", "scaled_to_blocks", "scaled_decode_tokens_per_s", "scaled_prefill_tokens_per_s",
             "scaling"}
SPEED_ROUND = {"decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes", "load_s"}
SUBJECT = {"tag", "label", "blocks", "scale_to_blocks", "artifact_build", "gguf_imatrix", "notes"}
KERNEL_RECORD = {"config", "out_features", "in_features", "batch", "target", "kernel", "code_layout", "ms", "ms_cold",
                 "baseline", "baseline_ms", "baseline_ms_cold", "speedup", "bandwidth_bound_ms",
                 "measured_bandwidth_gbs", "cold_vs_bound", "alternatives_ms", "aqlm_package_ms",
                 "aqlm_package_rel_diff", "aqlm_package_threads", "threads", "speedup_vs_aqlm_package", "bf16_ms",
                 "speedup_vs_bf16"}
REPORT = {"schema_version", "quick", "threads", "rounds", "skipped", "notes", "machine", "quality", "speed",
          "kernels", "gpu", "wall_s", "command", "date"}

# file pattern (relative to benchmarks/results) → (writer, top-level keys or None for a list, keys of each record)
WRITERS = {
    "*/report.json": ("aqlm-compile bench --report (aqlm_compile/bench/report.py)", REPORT, None),
    "*/gpu.json": ("bash benchmarks/gpu.sh (aqlm_compile/bench/gpu.py)", None, None),  # checked by its own test
    "kernels-x86*.json": ("aqlm-compile bench --kernels --json-out", None, KERNEL_RECORD),
    "*/kernels-x86*.json": ("aqlm-compile bench --kernels --json-out (one machine's folder)", None, KERNEL_RECORD),
    "ort-op-x86.json": ("benchmarks/ort_op.py", None,
                        {"config", "out_features", "in_features", "batch", "target", "ms", "baseline", "baseline_ms",
                         "speedup", "rel_err", "threads", "timing_process", "portable_ms"}),
    "ort-memory-x86.json": ("benchmarks/ort_memory.py", None,
                            {"model", "session_init_s", "rss_after_init_mb", "rss_after_prefill_mb", "peak_rss_mb",
                             "file_mb"}),
    "generate-x86.json": ("benchmarks/generate_speed.py",
                          {"prompt", "new_tokens", "machine", "artifact", "compare", "tokens_per_s",
                           "all_tokens_per_s", "same_tokens_as_ort_aqlm", "aqlm_vs_dense", "tvm_aqlm_vs_tvm_dense"},
                          None),
    "*/kernels-vs-*.json": ("benchmarks/kernels_vs_commit.py",
                            {"what", "command", "base", "head", "head_has_uncommitted_changes", "threads", "pairs",
                             "rounds", "machine", "wall_s", "rows"}, None),
    "*/profile-*.json": ("benchmarks/profile_relax.py",
                         {"what", "command", "artifact", "function", "tokens", "past", "threads", "calls", "machine",
                          "uninstrumented_ms", "instrumented_sum_ms", "primfuncs_ms", "builtins_ms", "rows"}, None),
    "*/ort-profile-*.json": ("benchmarks/profile_ort.py",
                             {"what", "command", "artifact", "past", "prompt", "threads", "calls", "machine",
                              "uninstrumented_ms", "profiled_run_ms", "nodes_sum_ms", "by_op_type", "slowest_nodes",
                              "wall_s"}, None),
    "*/decode-ab-*.json": ("benchmarks/decode_ab.py",
                           {"what", "command", "past", "rounds", "steps", "threads", "machine", "wall_s", "rows"}, None),
    "*/attention-ab-*.json": ("benchmarks/attention_ab.py",
                              {"what", "command", "threads", "rounds", "machine", "wall_s", "rows"}, None),
    "*/dense-head-*.json": ("benchmarks/dense_head_sweep.py",
                            {"what", "command", "threads", "rounds", "calls", "machine", "wall_s", "rows"}, None),
    "*/head-int8-ppl-*.json": ("benchmarks/head_int8_ppl.py",
                               {"what", "command", "checkpoint", "config", "tied_embedding", "windows", "seqlen",
                                "ppl_fp16_head", "ppl_int8_head", "ppl_increase_pct", "head_bytes_fp16",
                                "head_bytes_int8", "ppl_int4_head", "ppl_int4_increase_pct", "head_bytes_int4",
                                "machine", "wall_s"}, None),
    "*/head-forms-ppl.json": ("benchmarks/head_forms_ppl.py",
                              {"what", "command", "model", "vocab", "hidden", "tied_embedding", "windows", "seqlen",
                               "quantize_seconds", "rows", "machine", "wall_s"}, None),
    "*/int8-prefill-ppl-*.json": ("benchmarks/int8_prefill_ppl.py",
                                  {"what", "command", "windows", "seqlen", "chunk", "positions", "ppl_int8", "ppl_fp32",
                                   "ppl_increase_pct", "argmax_agreement", "greedy_tokens", "greedy_same",
                                   "greedy_prompts", "greedy_same_as_torch", "int8_artifact", "fp32_artifact", "machine", "wall_s"}, None),
    "*/lut-decode-ppl-*.json": ("benchmarks/lut_decode_ppl.py",
                                {"what", "table", "reference", "command", "windows", "seqlen", "decode_steps", "ppl_lut", "ppl_reference",
                                 "ppl_increase_pct", "argmax_agreement", "lut_artifact", "reference_artifact",
                                 "machine", "wall_s"}, None),
    "*/ppl-per-byte-*.json": ("benchmarks/ppl_per_byte.py", {"what", "command", "fp_ppl", "rows", "machine", "wall_s"},
                              None),
    "*/pv-code-step-*.json": ("benchmarks/pv_code_step.py",  # before "*/pv-*.json": the first match wins
                              {"what", "command", "checkpoint", "steps", "windows", "val_windows", "rows", "machine",
                               "wall_s"}, None),
    "*/pv-*.json": ("benchmarks/pv_smollm2.py",
                    {"what", "command", "checkpoint", "config", "embedding", "head", "windows", "seqlen", "fp_ppl",
                     "ppl_before", "ppl_after", "file_bytes", "pv_steps", "pv_seconds", "pv_wall_s",
                     "pv_peak_rss_bytes", "val_kl", "code_change_per_step", "settings", "machine", "wall_s"}, None),
    "*/quantize-memory-*.json": ("benchmarks/quantize_memory.py",
                                 {"what", "command", "shapes", "threads", "rows", "disk_peak_growth", "machine",
                                  "wall_s"}, None),
    "*/quantize-scaling.json": ("benchmarks/quantize_scaling.py",
                                {"what", "command", "memory_result", "smollm2", "llama2_7b_block", "unit_costs",
                                 "projections", "threads", "machine", "wall_s", "derived"}, None),
    "*/fuzz.json": ("benchmarks/fuzz.py", {"what", "command", "counts", "seed", "totals", "all", "failures",
                                           "machine", "wall_s"}, None),
    "*smollm2-*.json": ("benchmarks/quantize_smollm2.sh",
                       {"model", "config", "preset", "machine", "quantize_seconds", "quantize_phases_seconds", "eval",
                        "quantize_wall_s", "quantize_peak_rss_bytes"}, None),
}


def writer_of(rel_path: str):
    for pattern, spec in WRITERS.items():
        if fnmatch.fnmatch(rel_path, pattern):
            return spec
    return None


def unknown_fields(data, top: set | None, record: set | None) -> list[str]:
    """Field paths in `data` that its writer does not write."""
    bad = []
    if isinstance(data, list):
        for i, r in enumerate(data):
            bad += [f"[{i}].{k}" for k in r if record is not None and k not in record]
        return bad
    if top is not None:
        bad += [k for k in data if k not in top]
    if top is REPORT:
        bad += [f"machine.{k}" for k in data.get("machine", {}) if k not in MACHINE]
        for i, r in enumerate(data.get("quality", {}).get("rows", [])):
            bad += [f"quality.rows[{i}].{k}" for k in r if k not in QUALITY_ROW]
        speed = data.get("speed", {})
        for i, r in enumerate(speed.get("rows", [])):
            bad += [f"speed.rows[{i}].{k}" for k in r if k not in SPEED_ROW]
            for j, rnd in enumerate(r.get("rounds", [])):
                bad += [f"speed.rows[{i}].rounds[{j}].{k}" for k in rnd if k not in SPEED_ROUND]
        for i, s in enumerate(speed.get("subjects", [])):
            bad += [f"speed.subjects[{i}].{k}" for k in s if k not in SUBJECT]
        for i, r in enumerate(data.get("kernels", {}).get("records", [])):
            bad += [f"kernels.records[{i}].{k}" for k in r if k not in KERNEL_RECORD]
    return bad


def check_report(data: dict) -> None:
    bad = unknown_fields(data, REPORT, None)
    if bad:
        raise ValueError(f"report.json: fields no schema declares (aqlm_compile/bench/records.py): {bad[:5]}")


def results_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def write_result(out_dir: Path, stem: str, result: dict, markdown: str) -> None:
    """`out_dir/stem.json` (the record, a declared writer's fields) and `stem.md` (its table), each written whole
    (temp file + rename), and the table printed: what every benchmark script ends with."""
    import json

    from ..cache import atomic_write_bytes

    atomic_write_bytes(Path(out_dir) / f"{stem}.json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(Path(out_dir) / f"{stem}.md", markdown.encode())
    print(markdown)
