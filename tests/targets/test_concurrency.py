"""8 threads generating at once on one ORT session and on one TVM decoder's loaded library give the same tokens as
one at a time (issue 15): the AQLM op serialises each node's calls (its scratch buffers are per node), and each
thread decodes on a `fork()` of the decoder (its own KV cache, and for TVM its own VM)."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from aqlm_compile.runtime.generate import generate, load_tokenizer

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Hello", "A B C D E F G H I J K L",
           "numbers 1 2 3", "the the the", "Why"]


def open_decoder(runtime, art):
    if runtime == "ort":
        from aqlm_compile.runtime.ort import OrtDecoder

        return OrtDecoder(art, threads=1)
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    return TvmDecoder(art, threads=1)


@pytest.mark.parametrize("runtime", ["ort", "tvm"])
def test_eight_threads_generate_the_tokens_of_one(runtime, llama_art):
    decoder = open_decoder(runtime, llama_art)
    tokenizer = load_tokenizer(llama_art / "weights")

    def run(prompt):
        # prompts longer than the GEMV batch run the prefill GEMM; then decode steps (GEMV)
        return generate(decoder.fork(), tokenizer, prompt, max_new_tokens=16, stop_at_eos=False)["new_tokens"]

    alone = [run(p) for p in PROMPTS]
    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(run, PROMPTS * 2))
        assert together == alone * 2
    assert len({tuple(t) for t in alone}) > 1  # the prompts do lead to different tokens
