import pytest

from chronicals.data import default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()
