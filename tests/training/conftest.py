import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: with the CI machine's cores shared by parallel test workers, one intra-op thread per
    # process is about 10x faster than contended multi-threading.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
