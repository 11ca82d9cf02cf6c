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
