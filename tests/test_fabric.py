"""setup / setup_module / setup_optimizers / backward / autocast on one device."""

import pytest
import torch
from test_exact import llama
from torch import nn

import torchinit


def small():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64),
                                              ("32-true", torch.float32)])
def test_true_precision_casts_and_converts_inputs(precision, dtype):
    """Lightning's true precisions: float inputs cast to the precision, forward under it as the default dtype, float
    outputs back in the default dtype (integer tensors untouched both ways)."""
    fabric = torchinit.Fabric(accelerator="cpu", precision=precision)
    module = small()
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, torch.get_default_dtype())))
    model = fabric.setup(module)  # built outside init_module: setup casts it
    assert all(p.dtype == dtype for p in model.parameters())
    out = model(torch.randn(3, 4))
    assert seen == [(dtype, dtype)] and out.dtype == torch.float32 and torch.get_default_dtype() == torch.float32
    integers = nn.Module()
    integers.forward = lambda x: (x, x.float())
    assert [t.dtype for t in fabric.setup(integers)(torch.arange(3))] == [torch.int64, torch.float32]


def test_mixed_keeps_fp32_weights_and_runs_forward_under_autocast():
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-mixed")
    with fabric.init_module():
        module = small()
    model = fabric.setup(module)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    assert model(torch.randn(3, 4)).dtype == torch.float32  # Lightning's rule: outputs back in the default dtype
    assert seen == [torch.bfloat16]  # ... and float inputs in the autocast dtype
    with fabric.autocast():
        assert module(torch.randn(3, 4)).dtype == torch.bfloat16
    assert module(torch.randn(3, 4)).dtype == torch.float32


def test_wrapper_is_transparent():
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-mixed")
    module = small()
    model = fabric.setup(module)
    assert model.module is module
    assert list(model.state_dict()) == list(module.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in module.named_parameters()]
    assert model.module[0] is module[0]
    module.custom_attribute = 3
    assert model.custom_attribute == 3
    model.load_state_dict(module.state_dict())
    with pytest.raises(ValueError, match="already set up"):
        fabric.setup(model)


def test_training_step_and_optimizer_made_before_setup():
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true", seed=0)
    with fabric.init_module(empty_init=True):
        module = llama()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)  # before setup: must stay valid
    with pytest.warns(UserWarning, match="initialized"):
        model, optimizer = fabric.setup(module, optimizer)
    before = model.lm_head.weight.detach().clone()
    loss = model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss
    fabric.backward(loss)
    optimizer.step()
    assert not torch.equal(model.lm_head.weight, before)


def test_seed_snippet_from_the_docs():
    """The README's snippet (empty init, load a checkpoint, setup, one step) is eager's model and eager's loss."""
    torch.manual_seed(0)
    checkpoint = small().state_dict()  # fp32, distinct random values: a dropped or misplaced load shows
    torch.manual_seed(0)
    want = small().to(torch.bfloat16)  # eager: the checkpoint's model, cast (copy_ into bf16 rounds as .to does)
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true")
    with fabric.init_module(empty_init=True):
        model = small()
    model.load_state_dict(checkpoint)
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters()))
    assert isinstance(optimizer, torch.optim.Adam)
    got = dict(model.named_parameters())
    assert got.keys() == dict(want.named_parameters()).keys()
    for name, value in want.named_parameters():
        assert torch.equal(got[name], value), f"{name}: the checkpoint's value, as eager casts it"
    batch = torch.randn(3, 4)
    loss = model(batch).sum()
    # one device, the same module on the same values and the same (cast) input: eager's computation exactly
    eager_loss = want(batch.to(torch.bfloat16)).float().sum()  # the output comes back in the default dtype
    assert torch.equal(loss, eager_loss)
    fabric.backward(loss)
    optimizer.step()
    eager_loss.backward()
    torch.optim.Adam(want.parameters()).step()
    for name, value in want.named_parameters():
        assert torch.equal(got[name], value), f"{name}: after one Adam step, as eager's"


def test_single_process_collectives():
    fabric = torchinit.Fabric(accelerator="cpu")
    assert fabric.launch(lambda f, x: (f.global_rank, f.world_size, x), 5) == (0, 1, 5)
    assert fabric.is_global_zero and fabric.broadcast("x") == "x"
    t = torch.ones(2)
    assert fabric.all_reduce(t) is t
    fabric.barrier()
    with pytest.raises(ValueError, match="reduce_op='maximum'"):
        fabric.all_reduce(t, reduce_op="maximum")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_mixed_on_cuda_scales_gradients():
    fabric = torchinit.Fabric(accelerator="cuda", precision="16-mixed")
    model, optimizer = fabric.setup(module := small(), torch.optim.SGD(module.parameters(), lr=0.1))
    out = model(torch.randn(2, 4, device="cuda"))
    assert out.dtype == torch.float32  # computed under fp16 autocast, returned in the default dtype (Lightning)
    fabric.backward(out.float().sum())
    assert isinstance(optimizer, torch.optim.SGD)
    optimizer.step()
    assert fabric.strategy.scaler.get_scale() > 0


def test_launch_joins_a_process_group_the_caller_made():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=2, world_size=4)
    try:
        fabric = torchinit.Fabric(accelerator="cpu", strategy="ddp", devices=4)
        fabric.launch()
        assert (fabric.global_rank, fabric.local_rank, fabric.world_size) == (2, 2, 4)
        with pytest.raises(ValueError, match="already made has 4 rank.*made for 2"):
            torchinit.Fabric(accelerator="cpu", strategy="ddp", devices=2).launch()
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()
