import os

import pytest
import torch
from torch import nn

import torchinit


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (duplicates included, so ties show up under every name) and buffers."""
    return {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers())}


def ties(module: nn.Module) -> list[list[str]]:
    """Names that share one tensor object (a tied parameter or buffer), each group sorted: the model's ties."""
    groups: dict[int, list[str]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def assert_bitwise_equal(got: nn.Module, want: nn.Module) -> None:
    """The same names, dtypes, devices and values (bit for bit), and the same ties: names that share one tensor
    object in `want` share one in `got`, and no others do (G3, G4)."""
    a, b = tensors(got), tensors(want)
    assert a.keys() == b.keys()
    wrong = [k for k in b if a[k].dtype != b[k].dtype or a[k].device != b[k].device or not torch.equal(a[k], b[k])]
    assert not wrong, f"differ from eager: {wrong}"
    assert ties(got) == ties(want), f"ties differ from eager's: {ties(got)} != {ties(want)}"


def on_fake_ranks(world: int, fn, strategy="fsdp", **fabric_kwargs) -> list:
    """`fn(fabric)` for each rank of a `world`-rank FSDP (or `strategy`) fabric, one after another in this process,
    each under the fake process group (collectives do nothing): per-rank results of a world size no machine here
    has."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    results = []
    for rank in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            fabric = torchinit.Fabric(accelerator="cpu", strategy=strategy, devices=world, **fabric_kwargs)
            fabric.launch()  # joins the group made here
            assert (fabric.global_rank, fabric.world_size) == (rank, world)
            results.append(fn(fabric))
        finally:
            dist.destroy_process_group()
    return results


_SEEDING = {module: [name for name in ("manual_seed", "manual_seed_all", "seed", "seed_all", "set_rng_state",
                                        "set_rng_state_all", "get_rng_state", "get_rng_state_all")
                      if hasattr(module, name)]
            for module in (torch, torch.random, torch.cuda, torch.cuda.random)}


def _beneath_dynamo(fn):
    """torch._dynamo's first import (in a process's first record) wraps torch.manual_seed in its `disable`
    decorator once and for all: compare what is beneath that wrapper (ours would show: they live elsewhere)."""
    while getattr(fn, "__wrapped__", None) is not None and fn.__code__.co_filename.endswith(
            os.path.join("torch", "_compile.py")):
        fn = fn.__wrapped__
    return fn


def global_state() -> tuple:
    """Everything an init or record context may touch: default dtype and device, mode stacks, hooks, nn.init,
    the seeding functions, Module._apply and FakeTensor.__deepcopy__."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.nn.modules import module as m
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return (
        {(module.__name__, name): _beneath_dynamo(getattr(module, name)) for module, names in _SEEDING.items()
         for name in names},
        nn.Module._apply,
        FakeTensor.__dict__.get("__deepcopy__"),
        torch.get_default_dtype(),
        torch.tensor([]).device,
        len(_get_current_function_mode_stack()),
        len(_get_current_dispatch_mode_stack()),
        len(m._global_parameter_registration_hooks),
        len(m._global_buffer_registration_hooks),
        len(m._global_module_registration_hooks),
        dict(vars(nn.init)),
    )


@pytest.fixture(autouse=True)
def no_leaked_global_state():
    """Every test must leave torch's global state as it found it (G2)."""
    before = global_state()
    yield
    assert global_state() == before
    assert not torchinit.init.context.ACTIVE
    assert not torchinit.init.context.RECORDS and not torchinit.init.record.RECORDING
