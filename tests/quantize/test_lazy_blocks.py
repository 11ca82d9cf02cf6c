"""The FP model read block by block (issue 16 item 1; `models.load_fp_model(lazy=True)`, used by `quantize --offload
disk`): the same model as a whole load, decoder layers on the meta device until the block loop reads them, and never
more than one FP block in memory while quantizing."""

import gc
import json
import shutil
import weakref

import pytest
import torch

from aqlm_compile.errors import ModelError
from aqlm_compile.models import block_linears, decoder_layers, load_fp_model
from aqlm_compile.quantize.pipeline import quantize_model
from aqlm_compile.quantize.methods import get_method

IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 8, 4]])


def _fp_blocks(layers):
    """Indices of the layers that hold an FP linear weight in memory."""
    return [i for i, layer in enumerate(layers)
            if any(isinstance(m, torch.nn.Linear) and not m.weight.is_meta for m in layer.modules())]


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2", "tiny_mistral"])
def test_lazy_model_is_the_whole_model(which, request):
    folder = request.getfixturevalue(which)
    whole, _ = load_fp_model(folder)
    lazy, _ = load_fp_model(folder, lazy=True)
    _, layers = decoder_layers(lazy)
    assert _fp_blocks(layers) == [] and len(layers) == whole.config.num_hidden_layers
    lazy.aqlm_lazy_blocks.load_all()
    with torch.no_grad():
        assert torch.equal(whole(IDS).logits, lazy(IDS).logits)
    lazy.aqlm_lazy_blocks.unload(0)
    assert _fp_blocks(layers) == list(range(1, len(layers)))


def test_the_embedding_is_read_without_a_random_one_first(tiny_llama, monkeypatch):
    """The skeleton's parameters outside the layers are built on the meta device and the file's tensors assigned:
    no embedding table is allocated and random-initialised first (≈ 4 GB at a 128k vocabulary)."""
    made = []
    init = torch.nn.Embedding.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self.weight.is_meta)

    monkeypatch.setattr(torch.nn.Embedding, "__init__", recording)
    model, _ = load_fp_model(tiny_llama, lazy=True)
    assert made and all(made)
    emb = model.get_input_embeddings().weight
    assert not emb.is_meta and emb.dtype == torch.float32 and float(emb.abs().sum()) > 0


def test_the_block_loop_holds_one_fp_block_at_a_time(tiny_llama):
    model, _ = load_fp_model(tiny_llama, lazy=True)
    _, layers = decoder_layers(model)
    lazy = model.aqlm_lazy_blocks
    seen = []
    original = lazy.load

    def load(i):
        layer = original(i)
        seen.append((i, _fp_blocks(layers)))
        return layer

    lazy.load = load
    fp_linears = []  # weak references to every FP linear the loop reads: each must be freed once its block is done

    def remember(i):
        layer = load(i)
        fp_linears.extend(weakref.ref(m) for m in layer.modules() if type(m) is torch.nn.Linear and not m.weight.is_meta)
        gc.collect()
        alive = [r for r in fp_linears if r() is not None and not r().weight.is_meta]
        held.append((i, len({id(r()) for r in alive})))
        return layer

    held = []
    lazy.load = remember
    method = get_method("aqlm").from_preset("tiny", {"kmeans_iters": 2, "max_rounds": 1, "global_epochs": 1.0})
    from aqlm_compile.config import AqlmConfig

    tokens = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    per_block = len(block_linears(layers[0]))
    quantize_model(model, tokens, AqlmConfig.parse("2x8g8"), method)
    assert seen, "the block loop never read a block"
    n = len(layers)
    # the teacher pass and the block loop read each block once, with no other FP block in memory; the final
    # load_all finds every block quantized
    assert seen == [(i, [i]) for i in range(n)] * 2 + [(i, []) for i in range(n)]
    # ... and nothing else (a dict, a hook, a context) keeps an FP linear of an earlier block alive
    assert [h for _, h in held[:2 * n]] == [per_block] * (2 * n), held
    gc.collect()
    assert all(r() is None or r().weight.is_meta for r in fp_linears)
    assert _fp_blocks(layers) == []  # every block quantized


def test_a_shard_outside_the_folder_is_refused(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    with pytest.raises(ModelError, match="model.safetensors.index.json: weight_map names '../model.safetensors'"):
        load_fp_model(folder, lazy=True)


def test_a_missing_layer_tensor_is_one_line(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_fp_model(folder, lazy=True)
    model.aqlm_lazy_blocks.load(0)
    with pytest.raises(ModelError, match=r"no tensor model.layers.1.mlp.up_proj.weight .*layer 1"):
        model.aqlm_lazy_blocks.load(1)


def test_layers_of_several_attention_types_are_loaded_whole(tiny_qwen2, tmp_path):
    """The block-wise passes reuse layer 0's mask: a model mixing sliding and full attention is not read lazily."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_qwen2, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention"])
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_fp_model(folder, lazy=True)
    assert getattr(model, "aqlm_lazy_blocks", None) is None and _fp_blocks(decoder_layers(model)[1]) == [0, 1]


def test_a_truncated_shard_while_loading_a_layer_is_one_line(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    model, _ = load_fp_model(folder, lazy=True)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelError, match=r"model.safetensors: unreadable while loading layer 1"):
        model.aqlm_lazy_blocks.load(1)
