"""`embedding.rows_int4` / `unpack_rows_int4`: the 4-bit embedding table of `build --embedding int4`."""

import pytest
import torch

from aqlm_compile.embedding import rows_int4, unpack_rows_int4


def test_int4_rows_round_trip_within_half_a_step():
    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(0))
    w[3] = 0  # a zero row keeps a usable scale
    w[5, :32] *= 100  # an outlier group does not spoil the row's other groups
    packed, scales = rows_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (37, 48)
    assert scales.dtype == torch.float16 and scales.shape == (37, 3)
    rows = unpack_rows_int4(packed, scales)
    step = scales.float().repeat_interleave(32, 1)
    assert torch.all((rows - w).abs() <= step / 2 + 1e-6)
    assert torch.equal(rows[3], torch.zeros(96))
    assert (rows[5, 32:] - w[5, 32:]).abs().max() < 0.3
    # any subset of rows unpacks alone (the embedding gathers the token's rows first)
    assert torch.equal(unpack_rows_int4(packed[[5, 3]], scales[[5, 3]]), rows[[5, 3]])


def test_int4_rows_without_whole_groups_use_one_scale_per_row():
    w = torch.randn(4, 6)
    packed, scales = rows_int4(w)
    assert scales.shape == (4, 1)
    assert torch.all((unpack_rows_int4(packed, scales) - w).abs() <= scales.float() / 2 + 1e-6)
    with pytest.raises(ValueError, match="odd"):
        rows_int4(torch.randn(2, 5))


def test_round_head_computes_what_the_int8_artifact_stores(tiny_llama_ckpt):
    """eval's `--head int8` (`round_head`) and the build's (`export.keep_head_int8`) give the same head and, for a
    tied embedding in its stored form, the same embedding rows."""
    import torch

    from aqlm_compile import format as fmt
    from aqlm_compile.embedding import round_head
    from aqlm_compile.export import keep_head_int8

    evaluated, _, _ = fmt.load(tiny_llama_ckpt)
    built, _, _ = fmt.load(tiny_llama_ckpt)
    assert evaluated.get_input_embeddings().weight is evaluated.lm_head.weight  # the tied case
    before = evaluated.lm_head.weight.detach().clone()
    round_head(evaluated, "int8")
    keep_head_int8(built)
    x = torch.randn(3, evaluated.lm_head.in_features)
    ids = torch.tensor([0, 5, 17])
    with torch.no_grad():
        assert torch.allclose(evaluated.lm_head(x).float(), built.lm_head(x).float(), atol=1e-5)
        assert torch.allclose(evaluated.get_input_embeddings()(ids).float(), built.get_input_embeddings()(ids).float(),
                              atol=1e-6)
    assert not torch.equal(before, evaluated.lm_head.weight)
    round_head(evaluated, "fp16")  # no-op


def test_round_head_refuses_an_aqlm_head(tiny_llama_ckpt):
    import pytest

    from aqlm_compile import format as fmt
    from aqlm_compile.embedding import round_head

    model, _, _ = fmt.load(tiny_llama_ckpt)
    with pytest.raises(ValueError, match="head 'int2'"):
        round_head(model, "int2")
    model.lm_head = model.model.layers[0].self_attn.q_proj  # an AqlmLinear
    with pytest.raises(ValueError, match="not a dense linear"):
        round_head(model, "int8")
