"""G3: without empty init, the model equals the eager model built with the same seed and cast — bit for bit."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_bitwise_equal
from torch import nn

import torchinit

TRUE_PRECISIONS = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16,
                   "64-true": torch.float64}


class Custom(nn.Module):
    """Init that reads and rewrites: out-of-place factories, scaled params, views, computed buffers."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(8, 8) * 0.02 + 1 / 3)
        self.proj = nn.Linear(8, 8)
        with torch.no_grad():
            self.proj.weight.mul_(1 / math.sqrt(24)).add_(0.001)
            self.proj.weight[:, :2].zero_()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 16, 2.0) / 16)), persistent=False)
        self.register_buffer("table", torch.outer(torch.arange(64.0), self.inv_freq).cos())
        self.register_buffer("explicit", torch.linspace(0, 1, 7, dtype=torch.float64))
        self.register_buffer("steps", torch.arange(5))


def plain_layers():
    return nn.ModuleDict(dict(
        linear=nn.Linear(16, 32), conv=nn.Conv2d(3, 4, 3), conv1d=nn.Conv1d(2, 3, 5),
        embedding=nn.Embedding(50, 8, padding_idx=3), mha=nn.MultiheadAttention(8, 2),
        layernorm=nn.LayerNorm(32), batchnorm=nn.BatchNorm1d(4), custom=Custom(),
    ))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def bert():
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64))


MODELS = {"plain": plain_layers, "llama": llama, "gpt2": gpt2, "bert": bert}


def eager(build, dtype, device="cpu", seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = build()
    return model.to(dtype)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("precision", TRUE_PRECISIONS)
@pytest.mark.parametrize("empty_init", [None, False])
def test_init_module_equals_eager_then_cast(model, precision, empty_init):
    fabric = torchinit.Fabric(accelerator="cpu", precision=precision)
    torch.manual_seed(0)
    with fabric.init_module(empty_init=empty_init):
        got = MODELS[model]()
    after = torch.rand(4)  # the random stream continues exactly where eager leaves it
    want = eager(MODELS[model], TRUE_PRECISIONS[precision])
    assert torch.equal(torch.rand(4), after)
    assert_bitwise_equal(got, want)


def test_ties_survive():
    with torchinit.Fabric(accelerator="cpu", precision="bf16-true").init_module():
        model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_low_precision_construction_is_not_what_we_do():
    """The comparison has teeth: constructing directly under a bf16 default dtype gives other values."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        naive = plain_layers()
    finally:
        torch.set_default_dtype(torch.float32)
    with pytest.raises(AssertionError, match="differ from eager"):
        assert_bitwise_equal(naive, eager(plain_layers, torch.bfloat16))


def test_rope_buffer_is_computed_in_fp32_then_cast():
    with torchinit.Fabric(accelerator="cpu", precision="bf16-true").init_module():
        model = llama()
    theta, dim = model.config.rope_parameters["rope_theta"], 16
    fp32 = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    assert torch.equal(model.model.rotary_emb.inv_freq, fp32.to(torch.bfloat16))


def test_no_fp32_copy_of_the_whole_model():
    """Peak host memory of a bf16-true build stays well under what an fp32 copy of the model would need."""
    script = textwrap.dedent("""
        import resource, torch, torchinit
        from torch import nn
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torchinit.Fabric(accelerator="cpu", precision="bf16-true").init_module():
            model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(192)])
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        print(grown, sum(p.numel() for p in model.parameters()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    grown, numel = map(int, out.stdout.split())
    bf16, fp32 = 2 * numel, 4 * numel  # 384 MiB and 768 MiB
    assert grown < bf16 + (fp32 - bf16) // 2, f"peak growth {grown / 2**20:.0f} MiB for a {bf16 / 2**20:.0f} MiB model"
