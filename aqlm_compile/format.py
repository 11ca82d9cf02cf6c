"""The checkpoint format: the Hugging Face AQLM layout, safetensors + config.json. `save`, `load`, `validate`.

Per quantized linear `<name>`: `<name>.codes` int8 (B ≤ 8) / int16 (B ≤ 16) [out, in/g, M], signed as the
reference stores them; `<name>.codebooks` [M, 2^B, 1, g]; `<name>.scales` [out, 1, 1, 1]; optional `<name>.bias`.
Every other tensor keeps its HF name. `config.json` is the model's config plus `quantization_config`
{quant_method "aqlm", nbits_per_codebook, num_codebooks, out_group_size, in_group_size,
linear_weights_not_to_quantize} and our own `aqlm_compile` block (source model, settings, timings, and
`layer_configs` {layer: "MxBgG"} for the layers whose config differs from quantization_config's — e.g. an lm_head
quantized with its own config. transformers + `aqlm` build every layer from the one quantization_config, so only a
checkpoint without `layer_configs` loads there; ours loads either.) A quantized lm_head is stored like any other
quantized linear, with `tie_word_embeddings` false and the embedding stored on its own.

Also here: the resumable work folder of an interrupted quantization run (per-block tensors + activations).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cache import atomic_dir, atomic_write_bytes
from .config import AqlmConfig
from .errors import ConfigError, FormatError, ModelError
from .nn import AqlmLinear, code_dtype
from .skeleton import build_with_meta_layers, meta_tensors

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")
STORAGE_DTYPE = torch.float16  # codebooks, scales and every unquantized tensor, as in published checkpoints


def quantized_modules(model) -> dict[str, AqlmLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AqlmLinear)}


def unquantized_linear_names(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


# config.json's aqlm_compile.mixed_configs, on any checkpoint whose layers do not all have quantization_config's config
_MIXED_NOTE = ("some layers have their own config (layer_configs): transformers + aqlm read one config per model, so "
               "this checkpoint loads in aqlm-compile only")


def save(out_dir: str | Path, model, aqlm_config: AqlmConfig, source_dir: str | Path | None = None,
         metadata: dict | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write the checkpoint atomically (a temporary folder renamed into place)."""
    out_dir = Path(out_dir)
    state = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        tensor = tensor.detach()
        state[name] = tensor.contiguous() if not tensor.is_floating_point() else tensor.to(STORAGE_DTYPE).contiguous()
    # Module names plus the .weight spelling older transformers releases compare against (docs/tvm-and-ort-notes.md N15)
    not_quantized = []
    for name in unquantized_linear_names(model):
        not_quantized += [name, f"{name}.weight"]
    quantized = quantized_modules(model)
    for name in ("model.embed_tokens", "lm_head"):
        if name not in not_quantized and name not in quantized:
            not_quantized += [name, f"{name}.weight"]
    layer_configs = {name: m.config.name for name, m in quantized.items() if m.config != aqlm_config}
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = aqlm_config.to_hf(not_quantized)
    config["dtype"] = "float16"
    config["torch_dtype"] = "float16"
    config["use_cache"] = True
    config["aqlm_compile"] = {"format_version": 1, "config": aqlm_config.name,
                              # relative to the checkpoint: never an absolute path of the quantizing machine
                              "source_model": _relative_source(source_dir, out_dir) if source_dir else None,
                              **({"layer_configs": layer_configs, "mixed_configs": _MIXED_NOTE} if layer_configs else {}),
                              **(metadata or {})}
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        if source_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(source_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
    return out_dir


def read_config(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FormatError(f"{path}: missing (expected an AQLM checkpoint directory)")
    try:
        config = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return config


def _relative_source(source_dir, out_dir) -> str:
    """The source model as a path relative to the checkpoint folder (models.find_source_model resolves it), or its
    folder name where no relative path exists (another drive)."""
    source = Path(source_dir).resolve()
    try:
        return Path(os.path.relpath(source, Path(out_dir).resolve())).as_posix()
    except ValueError:
        return source.name


def check_tokenizer_files(ckpt_dir: Path) -> None:
    """The JSON tokenizer files of a checkpoint parse (a corrupt one is named here, not deep in a tokenizer
    library, and is never copied into an artifact)."""
    for name in TOKENIZER_FILES:
        path = Path(ckpt_dir) / name
        if name.endswith(".json") and path.is_file():
            try:
                json.loads(path.read_bytes())
            except (ValueError, RecursionError) as exc:
                raise FormatError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None


def load_tokenizer(ckpt_dir: str | Path):
    """The checkpoint's tokenizer (transformers), or a FormatError naming the folder."""
    from transformers import AutoTokenizer

    check_tokenizer_files(Path(ckpt_dir))
    try:
        return AutoTokenizer.from_pretrained(Path(ckpt_dir))
    except Exception as exc:  # noqa: BLE001 - tokenizers/transformers raise many types for a bad file
        raise FormatError(f"{ckpt_dir}: its tokenizer files cannot be loaded ({str(exc).splitlines()[0][:200]})") \
            from None


def is_checkpoint(path: str | Path) -> bool:
    try:
        return read_config(Path(path)).get("quantization_config", {}).get("quant_method") == "aqlm"
    except FormatError:
        return False


def _read_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    path = ckpt_dir / WEIGHTS
    if not path.is_file():
        raise FormatError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None


def layer_configs(config: dict, where: str) -> dict[str, AqlmConfig]:
    """config.json's `aqlm_compile.layer_configs`: {layer name: its AqlmConfig} where it differs from the model's."""
    block = config.get("aqlm_compile", {})
    raw = block.get("layer_configs", {}) if isinstance(block, dict) else {}
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: aqlm_compile.layer_configs: expected an object {{layer: 'MxBgG'}}")
    out = {}
    for name, text in raw.items():
        try:
            out[name] = AqlmConfig.parse(text if isinstance(text, str) else repr(text))
        except ConfigError as exc:
            raise FormatError(f"{where}: aqlm_compile.layer_configs.{name}: {exc}") from None
    return out


def validate(ckpt_dir: str | Path) -> tuple[AqlmConfig, dict, dict[str, torch.Tensor]]:
    """Check config.json and every AQLM tensor's dtype, shape and code range. Returns (config, hf config, tensors)."""
    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    where = str(ckpt_dir / "config.json")
    if "quantization_config" not in config:
        raise FormatError(f"{where}: quantization_config: missing (not an AQLM checkpoint)")
    try:
        aqlm_config = AqlmConfig.from_hf(config["quantization_config"], where)
    except ConfigError as exc:
        raise FormatError(str(exc)) from None
    not_q = config["quantization_config"].get("linear_weights_not_to_quantize", [])
    if not isinstance(not_q, list) or not all(isinstance(x, str) for x in not_q):
        raise FormatError(f"{where}: quantization_config.linear_weights_not_to_quantize: expected a list of names")
    own = layer_configs(config, where)
    check_tokenizer_files(ckpt_dir)
    tensors = _read_tensors(ckpt_dir)
    wfile = ckpt_dir / WEIGHTS
    layers = sorted(name[: -len(".codes")] for name in tensors if name.endswith(".codes"))
    if not layers:
        raise FormatError(f"{wfile}: no '<layer>.codes' tensors (nothing is quantized)")
    unknown = sorted(set(own) - set(layers))
    if unknown:
        raise FormatError(f"{where}: aqlm_compile.layer_configs.{unknown[0]}: no such quantized layer in {wfile.name}")
    for layer in layers:
        layer_config = own.get(layer, aqlm_config)
        m, k, g = layer_config.num_codebooks, layer_config.codebook_size, layer_config.in_group_size
        want_dtype = code_dtype(layer_config)
        codes = tensors[f"{layer}.codes"]
        for part in ("codebooks", "scales"):
            if f"{layer}.{part}" not in tensors:
                raise FormatError(f"{wfile}: {layer}.{part}: missing")
        out, groups = codes.shape[0], codes.shape[1] if codes.dim() == 3 else -1
        if codes.dtype != want_dtype or codes.dim() != 3 or codes.shape[2] != m:
            raise FormatError(f"{wfile}: {layer}.codes: expected {str(want_dtype)[6:]} [out, in/{g}, {m}], "
                              f"found {str(codes.dtype)[6:]} {list(codes.shape)}")
        half = 1 << (layer_config.nbits_per_codebook - 1)
        if codes.numel() and (int(codes.min()) < -half or int(codes.max()) >= half):
            raise FormatError(f"{wfile}: {layer}.codes: values outside [{-half}, {half - 1}] for "
                              f"{layer_config.nbits_per_codebook}-bit codes")
        checks = {"codebooks": [m, k, 1, g], "scales": [out, 1, 1, 1]}
        for part, shape in checks.items():
            t = tensors[f"{layer}.{part}"]
            if list(t.shape) != shape or not t.is_floating_point():
                raise FormatError(f"{wfile}: {layer}.{part}: expected float {shape}, found {str(t.dtype)[6:]} {list(t.shape)}")
            if not torch.isfinite(t).all():
                raise FormatError(f"{wfile}: {layer}.{part}: contains NaN or inf")
        if f"{layer}.bias" in tensors and list(tensors[f"{layer}.bias"].shape) != [out]:
            raise FormatError(f"{wfile}: {layer}.bias: expected [{out}], found {list(tensors[f'{layer}.bias'].shape)}")
    return aqlm_config, config, tensors


# config.json sizes a model is built from, and the largest value any real model has (a larger one is a corrupt or
# hostile file: it is refused before anything is allocated)
SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
               "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
               "head_dim": 1 << 12, "max_position_embeddings": 1 << 24}


def _check_sizes(ckpt_dir: Path, raw: dict, tensors: dict) -> None:
    """config.json's sizes are integers in range and agree with the tensors the file holds (the block count and the
    embedding), checked before a model is built from them."""
    where = ckpt_dir / "config.json"
    for key, high in SIZE_LIMITS.items():
        if key in raw and raw[key] is not None and (type(raw[key]) is not int or not 1 <= raw[key] <= high):
            raise FormatError(f"{where}: {key}: expected an integer in 1..{high}, found {str(raw[key])[:40]!r}")
    blocks = {int(m.group(1)) for m in map(_BLOCK_INDEX.match, tensors) if m}
    n = raw.get("num_hidden_layers")
    if n is not None and blocks and max(blocks) + 1 != n:
        raise FormatError(f"{where}: num_hidden_layers: {n}, but {WEIGHTS} holds blocks 0..{max(blocks)}")
    emb = tensors.get("model.embed_tokens.weight")
    if emb is not None and emb.dim() == 2 and [raw.get("vocab_size"), raw.get("hidden_size")] != list(emb.shape):
        raise FormatError(f"{where}: vocab_size {raw.get('vocab_size')!r} x hidden_size {raw.get('hidden_size')!r} "
                          f"does not match model.embed_tokens.weight {list(emb.shape)} in {WEIGHTS}")


_BLOCK_INDEX = re.compile(r"model\.layers\.(\d+)\.")


def _build_model(ckpt_dir: Path, raw: dict, aqlm_config, tensors, dtype):
    """The HF model of config.json with `AqlmLinear` in place of every quantized layer, every tensor's name and
    shape checked against it (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_sizes(ckpt_dir, raw, tensors)
    clean = {k: v for k, v in raw.items() if k not in ("quantization_config", "aqlm_compile")}
    try:
        hf_config = AutoConfig.for_model(**clean)
        hf_config.use_cache = False
        if torch.get_default_device().type == "meta":
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
        else:  # the decoder layers on the meta device: their dense linears are never allocated (load assigns them)
            # the other parameters too (embeddings, head, norms): load assigns the file's, nothing random first
            model, _ = build_with_meta_layers(hf_config, dtype, str(ckpt_dir / "config.json"), empty_params=True)
    except ModelError as exc:
        raise FormatError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a config it cannot use
        raise FormatError(f"{ckpt_dir / 'config.json'}: not a usable model config "
                          f"({(str(exc).splitlines() or [type(exc).__name__])[0][:200]})") from None
    layers = sorted(name[: -len(".codes")] for name in tensors if name.endswith(".codes"))
    own = layer_configs(raw, str(ckpt_dir / "config.json"))
    modules = dict(model.named_modules())
    for layer in layers:
        linear = modules.get(layer)
        if not isinstance(linear, torch.nn.Linear):
            raise FormatError(f"{ckpt_dir / WEIGHTS}: {layer}.codes: the model has no linear layer named {layer}")
        codes = tensors[f"{layer}.codes"]
        cfg = own.get(layer, aqlm_config)
        if codes.shape[0] != linear.out_features or codes.shape[1] * cfg.in_group_size != linear.in_features:
            raise FormatError(f"{ckpt_dir / WEIGHTS}: {layer}.codes: expected [{linear.out_features}, "
                              f"{linear.in_features // cfg.in_group_size}, {cfg.num_codebooks}] for a "
                              f"{linear.in_features}->{linear.out_features} layer, found {list(codes.shape)}")
        with torch.device("meta"):  # filled by load (assign): nothing allocated twice
            replace_module(model, layer, AqlmLinear(linear.in_features, linear.out_features, cfg,
                                                    bias=linear.bias is not None, dtype=dtype))
    expected = set(model.state_dict())
    if getattr(hf_config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise FormatError(f"{ckpt_dir / WEIGHTS}: tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in model.state_dict().items():
        if name in tensors and list(tensors[name].shape) != list(t.shape):
            raise FormatError(f"{ckpt_dir / WEIGHTS}: {name}: expected shape {list(t.shape)}, found {list(tensors[name].shape)}")
    return model, hf_config


def check_model(ckpt_dir: str | Path):
    """`validate` plus the structural checks of `load` (layer names and shapes against config.json), on the meta
    device: cheap for any model size. Returns (AqlmConfig, hf config dict, tensors)."""
    ckpt_dir = Path(ckpt_dir)
    aqlm_config, raw, tensors = validate(ckpt_dir)
    with torch.device("meta"):
        _build_model(ckpt_dir, raw, aqlm_config, tensors, torch.float32)
    return aqlm_config, raw, tensors


def load(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Validate, then build the model with `AqlmLinear` layers. Returns (model, AqlmConfig, metadata)."""
    ckpt_dir = Path(ckpt_dir)
    aqlm_config, raw, tensors = validate(ckpt_dir)
    with torch.device("meta"):  # every structural check first, with nothing allocated
        _build_model(ckpt_dir, raw, aqlm_config, tensors, dtype)
    model, hf_config = _build_model(ckpt_dir, raw, aqlm_config, tensors, dtype)
    # each tensor in the dtype its module holds (what copying into the module did before `assign`): codes stay
    # integers, anything else becomes `dtype`, whatever the file stored it as
    want = {name: t.dtype for name, t in model.state_dict().items()}
    state = {name: t.to(want.get(name, dtype) if t.is_floating_point() or want.get(name, t.dtype).is_floating_point
                         else t.dtype)
             for name, t in tensors.items()}
    del tensors
    model.load_state_dict(state, strict=False, assign=True)  # the file's tensors become the parameters
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    left = meta_tensors(model)
    if left:  # _build_model compared every name: only a buffer no checkpoint carries can be left
        raise FormatError(f"{ckpt_dir / WEIGHTS}: {left[0]} is not in the checkpoint")
    model.eval()
    return model, aqlm_config, raw.get("aqlm_compile", {})


def replace_module(model, name: str, new_module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_module)


class WorkFolder:
    """Resumable state of a quantization run: `blocks/{i}.safetensors`, `activations-{n}.safetensors` (the inputs
    of block n, the outputs of the quantized blocks before it) and `progress.json` — the commit point, written last:
    it names `next_block` n, so the files it points to are always complete and belong together. A kill anywhere
    before progress.json is replaced leaves the previous commit whole (its activations file is removed only after
    the new progress.json is in place); resume never pairs a block index with another block's activations."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def start(self, fingerprint: dict, resume: bool) -> int:
        """Returns the index of the first block left to do (0 for a fresh run)."""
        progress = self.path / "progress.json"
        if resume and progress.is_file():
            state = json.loads(progress.read_text())
            if state.get("fingerprint") != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(state.get("fingerprint", {}))
                              if fingerprint.get(k) != state.get("fingerprint", {}).get(k))
                raise FormatError(f"{progress}: was written by a run with different settings ({', '.join(diff)}); "
                                  "rerun without --resume to start over")
            next_block = int(state["next_block"])
            for stale in self.path.glob("activations-*.safetensors"):  # a kill after a commit, before its cleanup
                # (a sharded run has one file per rank: activations-{n}.rank{r}-of-{w}.safetensors)
                if not stale.name.startswith(f"activations-{next_block}."):
                    stale.unlink(missing_ok=True)
            return next_block
        if self.path.exists():
            shutil.rmtree(self.path)
        (self.path / "blocks").mkdir(parents=True)
        atomic_write_bytes(progress, json.dumps({"fingerprint": fingerprint, "next_block": 0}).encode())
        return 0

    def _activations(self, next_block: int, shard: str = "") -> Path:
        return self.path / f"activations-{next_block}{shard}.safetensors"

    def save_block(self, index: int, block_state: dict[str, torch.Tensor], activations, report: dict) -> None:
        """Commit block `index`: its state, the next block's inputs (`activations`: a tensor, written; or a
        `quantize.activations.DiskActivations` in this folder, synced and renamed into place: no copy), then
        progress.json."""
        self.save_activations(index, activations)
        self.commit_block(index, block_state, report)
        self.drop_activations(index)

    def save_activations(self, index: int, activations, shard: str = "") -> None:
        """The inputs of block `index + 1` (`shard`: one rank's slice of the windows, in a file of its own), before
        the commit that names them."""
        final = self._activations(index + 1, shard)
        if not isinstance(activations, torch.Tensor):
            activations.flush()
            activations.rename(final)
            return
        tmp = final.with_name(f".{final.name}.tmp")
        save_file({"hidden": activations.detach().contiguous()}, str(tmp))
        os.replace(tmp, final)

    def commit_block(self, index: int, block_state: dict[str, torch.Tensor], report: dict) -> None:
        """Block `index`'s state, then progress.json naming block `index + 1` as next: the commit point (its
        activations are saved already)."""
        fingerprint = json.loads((self.path / "progress.json").read_text())["fingerprint"]
        final = self.path / "blocks" / f"{index}.safetensors"
        tmp = final.with_name(f".{final.name}.tmp")
        save_file({k: v.detach().contiguous() for k, v in block_state.items()}, str(tmp))
        os.replace(tmp, final)
        reports = self.reports() + [report]
        atomic_write_bytes(self.path / "progress.json", json.dumps(
            {"fingerprint": fingerprint, "next_block": index + 1, "reports": reports}).encode())

    def drop_activations(self, index: int, shard: str = "") -> None:
        """The inputs of block `index`, no longer named by progress.json once block `index` is committed."""
        self._activations(index, shard).unlink(missing_ok=True)

    def reports(self) -> list[dict]:
        progress = self.path / "progress.json"
        return json.loads(progress.read_text()).get("reports", []) if progress.is_file() else []

    def fingerprint(self) -> dict | None:
        """The fingerprint of the run this folder belongs to (None when there is none)."""
        progress = self.path / "progress.json"
        return json.loads(progress.read_text()).get("fingerprint") if progress.is_file() else None

    def load_block(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "blocks" / f"{index}.safetensors"))

    def has_activations(self, shard: str = "") -> bool:
        """Whether the inputs of the block progress.json names as next are there (`shard`: one rank's slice)."""
        next_block = int(json.loads((self.path / "progress.json").read_text())["next_block"])
        return self._activations(next_block, shard).is_file()

    def load_activations(self, on_disk: bool = False, shard: str = ""):
        """The inputs of the block progress.json names as next: a tensor, or with `on_disk` the file itself
        (`quantize.activations.DiskActivations`, read a batch at a time). `shard`: one rank's slice."""
        next_block = int(json.loads((self.path / "progress.json").read_text())["next_block"])
        path = self._activations(next_block, shard)
        if not path.is_file():
            raise FormatError(f"{path}: missing (the work folder {self.path} is incomplete; rerun without --resume)")
        if on_disk:
            from .quantize.activations import DiskActivations

            return DiskActivations(path)
        return load_file(str(path))["hidden"]

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
