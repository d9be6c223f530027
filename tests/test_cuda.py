"""G1/G3 on CUDA: skipped without a GPU."""

import pytest
import torch
from conftest import assert_bitwise_equal
from test_exact import MODELS, eager

import torchinit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("16-true", torch.float16),
                                              ("32-true", torch.float32)])
def test_exact_on_cuda(model, precision, dtype):
    fabric = torchinit.Fabric(accelerator="cuda", precision=precision)
    torch.manual_seed(0)
    with fabric.init_module():
        got = MODELS[model]()
    assert all(p.device.type == "cuda" for p in got.parameters())
    assert_bitwise_equal(got, eager(MODELS[model], dtype, device="cuda"))


def test_empty_init_on_cuda_then_load():
    fabric = torchinit.Fabric(accelerator="cuda", precision="bf16-true")
    want = eager(MODELS["llama"], torch.bfloat16, device="cuda")
    with torchinit.nan_poison(), fabric.init_module(empty_init=True):
        got = MODELS["llama"]()
    got.load_state_dict(want.state_dict())
    assert_bitwise_equal(got, want)
