"""The Relax artifact's parameter file past 2 GiB (issue 16 item 3): the calls `targets/relax.py` writes it with and
`runtime/tvm_runtime.py` reads it with keep every byte of a tensor larger than 2³¹ bytes."""

import numpy as np
import pytest


@pytest.mark.slow
def test_a_params_file_past_2gib_round_trips(tmp_path):
    import tvm

    n = (2**31 + 4096 * 3) // 2  # fp16 elements: just past 2 GiB
    big = np.empty(n, dtype=np.float16)
    big[:: 1 << 20] = np.arange(len(big[:: 1 << 20]), dtype=np.float16)  # a pattern spread over the whole range
    big[-1] = np.float16(7.5)
    small = np.arange(12, dtype=np.int32).reshape(3, 4)
    path = tmp_path / "params.bin"
    tvm.runtime.save_param_dict_to_file({"p00000": tvm.runtime.tensor(big), "p00001": tvm.runtime.tensor(small)},
                                        str(path))
    assert path.stat().st_size > 2**31
    loaded = tvm.runtime.load_param_dict_from_file(str(path))
    assert sorted(loaded) == ["p00000", "p00001"]
    back = loaded["p00000"].numpy()
    assert back.shape == (n,) and back[-1] == np.float16(7.5)
    assert np.array_equal(back[:: 1 << 20], big[:: 1 << 20])
    assert np.array_equal(loaded["p00001"].numpy(), small)
