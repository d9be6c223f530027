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


def test_meta_to_cuda_is_the_eager_model_and_setup_warns_about_split_devices():
    from test_materialize import on_meta

    want = eager(MODELS["llama"], torch.bfloat16, device="cuda")
    with torchinit.nan_poison(), torchinit.InitContext("cuda", torch.bfloat16, meta=True):
        got = MODELS["llama"]()
    torchinit.materialize(got, "cuda", torch.bfloat16, checkpoint=want.state_dict())
    assert_bitwise_equal(got, want)

    split = on_meta(lambda: torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    torchinit.materialize(split, "cpu")
    split[1].cuda()
    with pytest.warns(UserWarning, match=r"parameters are on 2 devices \(cpu, cuda:0\)"):
        model = torchinit.Fabric(accelerator="cuda").setup(split)
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_preflight_on_cuda():
    free, total = torch.cuda.mem_get_info()
    with torch.device("meta"):
        model = torch.nn.Embedding(total // 2**10, 2**9)  # 2 x the device in fp32
    with pytest.raises(torchinit.InsufficientMemoryError, match="larger than the whole device"):
        torchinit.materialize(model, "cuda")
    assert model.weight.device.type == "meta"


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float32], ids=["same-dtype", "cast"])
def test_safetensors_into_a_cuda_meta_model_through_the_pinned_ring(file_dtype, monkeypatch, tmp_path):
    from safetensors.torch import save_file

    from torchinit.checkpoint import safetensors as reader

    monkeypatch.setattr(reader, "SLOT", 2**14)  # many batches: every slot is reused, each after its event
    want = eager(MODELS["llama"], file_dtype, device="cuda")
    save_file({k: v.cpu() for k, v in want.state_dict().items()}, tmp_path / "model.safetensors")
    with torchinit.nan_poison(), torchinit.InitContext("cuda", torch.bfloat16, meta=True):
        got = MODELS["llama"]()
    torchinit.load_checkpoint(got, tmp_path / "model.safetensors", device="cuda", dtype=torch.bfloat16)
    assert_bitwise_equal(got, want.to(torch.bfloat16))


def test_materializing_on_cuda_grows_the_allocator_once():
    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(8)])  # 16 MiB each
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # nothing cached that the tensors could reuse
    segments, reserved = torch.cuda.memory_stats().get("segment.large_pool.allocated", 0), torch.cuda.memory_reserved()
    torchinit.materialize(model, "cuda", check_values=False)
    assert torch.cuda.memory_stats()["segment.large_pool.allocated"] - segments == 1  # one cudaMalloc, not eight
    assert torch.cuda.memory_reserved() - reserved >= 8 * 2048 * 2048 * 4


def test_record_context_on_cuda_in_a_fresh_process():
    """Before CUDA's lazy init `torch.cuda.default_generators` is empty: the record context initializes CUDA."""
    import subprocess
    import sys

    code = ("import torch, torchinit\n"
            "with torchinit.RecordContext('cuda:0'):\n"
            "    m = torch.nn.Linear(4, 4)\n"
            "torchinit.materialize(m, 'cuda:0')\n"
            "print(m.weight.device)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "cuda:0" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "unit-by-unit"])
def test_fsdp_cpu_offload_keeps_the_shards_on_the_cpu(record):
    from dist_workers import fsdp_cpu_offload

    strategy = torchinit.FSDPStrategy(wrap={torch.nn.Linear}, cpu_offload=True)  # children sharded before parents
    fabric = torchinit.Fabric(accelerator="cuda", devices=1, strategy=strategy)
    got = fabric.launch(fsdp_cpu_offload, record)
    assert got["devices"] == {"cpu"} and got["pinned"] and got["moved"], got
    assert got["bound"] == "cuda:0", "nccl is given the rank's device"


def test_loads_share_one_side_stream_per_gpu(tmp_path):
    from safetensors.torch import save_file

    from torchinit.checkpoint import safetensors as reader

    save_file({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, tmp_path / "m.safetensors")
    for _ in range(3):
        model = torch.nn.Linear(4, 4, device="cuda")
        torchinit.load_checkpoint(model, tmp_path / "m.safetensors", device="cuda")
    assert len(reader._SIDE_STREAMS) == 1


def test_init_module_on_cuda_peaks_at_the_model_plus_one_fp32_tensor():
    """The seed's memory claim on the device: bf16-true `init_module()` never holds the model in fp32; at most
    one tensor at a time is computed in fp32 (issue 12, part 5)."""
    def build():
        return torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(6)], torch.nn.LayerNorm(2048))

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torchinit.Fabric(accelerator="cuda", precision="bf16-true").init_module():
        model = build()
    torch.cuda.synchronize()
    tensors = [*model.parameters(), *model.buffers()]
    size = sum(t.numel() * t.element_size() for t in tensors)
    largest_fp32 = max(t.numel() for t in tensors) * 4
    assert all(t.dtype == torch.bfloat16 and t.is_cuda for t in tensors)
    assert torch.cuda.max_memory_allocated() - base <= size + largest_fp32 + 2**20  # (+ the allocator's rounding)
