import os

import pytest
import torch

torch.set_num_threads(2)
if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors; read when a kernel is defined (import)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many small tiny-model ops: on the 2-core CI box, two OpenMP threads spin against each other
    (up to 10x slower), so such a module runs single-threaded and restores the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (converted from GGUF once, then loaded from the cached checkpoint)."""
    from leankv_hf.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_tok():
    from leankv_hf.testing import tiny_tokenizer

    return tiny_tokenizer()
