import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_corpus(tiny_root):
    from tiny_models import write_corpus

    return write_corpus(tiny_root / "corpus.txt")


@pytest.fixture(scope="session")
def tiny_llama(tiny_root):
    from tiny_models import make_model

    return make_model(tiny_root / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_root):
    from tiny_models import make_model

    return make_model(tiny_root / "qwen2", "qwen2")


@pytest.fixture(scope="session")
def tiny_mistral(tiny_root):
    from tiny_models import make_model

    return make_model(tiny_root / "mistral", "mistral")
