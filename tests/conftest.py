import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (converted from GGUF once, then loaded from the cached checkpoint)."""
    from leankv_hf.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_tok():
    from leankv_hf.testing import tiny_tokenizer

    return tiny_tokenizer()
