"""Strategy options with Lightning's argument names (options.py), the policies that pick modules (policies.py), the
DeepSpeed config they build and Lightning's strategy names — one process, no launch."""

import dataclasses
import functools
from datetime import timedelta

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecision, MixedPrecisionPolicy, ShardingStrategy
from torch.distributed.fsdp.wrap import (
    CustomPolicy,
    ModuleWrapPolicy,
    size_based_auto_wrap_policy,
    transformer_auto_wrap_policy,
)

import torchinit
from torchinit.strategies import deepspeed_config
from torchinit.strategies.base import Layout
from torchinit.strategies.policies import checkpoint_activations, picked
from torchinit.strategies.select import strategy_for


class Block(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.inner, self.outer = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.outer(torch.relu(self.inner(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.big = nn.Linear(16, 16)  # 272 parameters: a size-based policy picks it alone

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.sum() + self.big(torch.ones(16)).sum()


def names(root, policy):
    return [path for path, _ in picked(root, policy)]


def test_auto_wrap_policy_is_wrap_under_lightnings_name():
    assert torchinit.FSDPStrategy(auto_wrap_policy={Block}) == torchinit.FSDPStrategy(wrap={Block})
    assert torchinit.FSDPStrategy(auto_wrap_policy={Block}).wrap == {Block}
    with pytest.raises(torchinit.ConfigurationError, match="one argument under two names"):
        torchinit.FSDPStrategy(wrap={Block}, auto_wrap_policy={nn.Linear})


def test_every_policy_form_picks_as_fsdp1_would():
    net = Net()
    assert names(net, None) == ["blocks.0", "blocks.1"]
    assert names(net, {Block}) == names(net, ModuleWrapPolicy({Block})) == ["blocks.0", "blocks.1"]
    assert names(net, lambda m: m is net.big) == ["big"]
    assert names(net, functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Block})) == \
        ["blocks.0", "blocks.1"]
    # size-based: asked with recurse=True on the way down, then with the parameters not already picked below
    assert names(net, functools.partial(size_based_auto_wrap_policy, min_num_params=100)) == ["big"]
    assert names(net, functools.partial(size_based_auto_wrap_policy, min_num_params=40)) == \
        ["blocks.0", "blocks.1", "big"]
    assert names(net, CustomPolicy(lambda m: isinstance(m, nn.Linear) and m.in_features == 16)) == ["big"]
    with pytest.raises(torchinit.ConfigurationError, match="sets FSDP1 arguments per module"):
        picked(net, CustomPolicy(lambda m: {"sharding_strategy": ShardingStrategy.NO_SHARD} if m is net.big else False))


def test_activation_checkpointing_recomputes_forward_with_equal_gradients():
    torch.manual_seed(0)
    plain = Net()
    checked = Net()
    checked.load_state_dict(plain.state_dict())
    assert checkpoint_activations(checked, {Block}) == ["blocks.0", "blocks.1"]
    assert checkpoint_activations(checked, {Block}) == [], "applied once"
    calls = []
    for block in checked.blocks:
        block.inner.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(3, 4, requires_grad=True)
    plain(x).backward()
    checked(x.detach().requires_grad_()).backward()
    assert len(calls) == 4, "each checkpointed block ran forward again in backward"
    for (name, a), b in zip(plain.named_parameters(), checked.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
    assert list(checked.state_dict()) == list(plain.state_dict()), "names unchanged"
    with torch.no_grad():
        calls.clear()
        checked(x)
    assert len(calls) == 2, "no recomputation without gradients"


def test_deprecated_activation_checkpointing_becomes_the_policy():
    with pytest.warns(DeprecationWarning, match="activation_checkpointing_policy"):
        options = torchinit.FSDPStrategy(activation_checkpointing=[Block])
    assert options.activation_checkpointing_policy == {Block} and options.activation_checkpointing is None
    with pytest.raises(torchinit.ConfigurationError, match="not also the deprecated"):
        torchinit.FSDPStrategy(activation_checkpointing=Block, activation_checkpointing_policy={Block})


def test_sharding_strategies_and_their_meshes():
    def options(world=4, nodes=2, **kwargs):
        return torchinit.Fabric(accelerator="cpu", strategy=torchinit.FSDPStrategy(**kwargs), devices=world // nodes,
                                num_nodes=nodes).plan.options

    assert options(sharding_strategy=ShardingStrategy.SHARD_GRAD_OP).sharding_strategy == "SHARD_GRAD_OP"
    assert not options(sharding_strategy="shard_grad_op").resharded and options().resharded
    assert options(sharding_strategy="HYBRID_SHARD").device_mesh == (2, 2), "nodes replicate, a node shards"
    assert options(sharding_strategy="HYBRID_SHARD", device_mesh=(1, 4)).device_mesh == (1, 4)
    assert options(sharding_strategy="NO_SHARD").device_mesh == (4, 1)
    assert options().device_mesh is None and not options().hybrid
    with pytest.raises(torchinit.ConfigurationError, match=r"must hold all 4 processes.*\(3, 1\)"):
        options(sharding_strategy="HYBRID_SHARD", device_mesh=(3, 1))
    with pytest.raises(torchinit.ConfigurationError, match="NO_SHARD replicates"):
        options(sharding_strategy="NO_SHARD", device_mesh=(2, 2))
    with pytest.raises(torchinit.ConfigurationError, match="pass no device_mesh"):
        torchinit.FSDPStrategy(device_mesh=(1, 2))
    with pytest.raises(torchinit.ConfigurationError, match="is not one of FULL_SHARD"):
        torchinit.FSDPStrategy(sharding_strategy="QUARTER_SHARD")


def test_fsdp1_objects_and_refusals():
    from torch.distributed.fsdp import CPUOffload

    assert torchinit.FSDPStrategy(cpu_offload=CPUOffload(offload_params=True)).cpu_offload is True
    assert torchinit.FSDPStrategy(cpu_offload=CPUOffload()).cpu_offload is False
    policy = CPUOffloadPolicy(pin_memory=False)
    assert torchinit.FSDPStrategy(cpu_offload=policy).cpu_offload is policy
    mixed = torchinit.FSDPStrategy(mixed_precision=MixedPrecision(param_dtype=torch.bfloat16,
                                                                  reduce_dtype=torch.float32)).mixed_precision
    assert mixed == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    with pytest.raises(torchinit.ConfigurationError, match="buffer_dtype"):
        torchinit.FSDPStrategy(mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16))
    with pytest.raises(torchinit.ConfigurationError, match="keep_low_precision_grads"):
        torchinit.FSDPStrategy(mixed_precision=MixedPrecision(keep_low_precision_grads=True))
    with pytest.raises(torchinit.ConfigurationError, match="use_orig_params=False"):
        torchinit.FSDPStrategy(use_orig_params=False)
    with pytest.raises(torchinit.ConfigurationError, match="'full' .* or 'sharded'"):
        torchinit.FSDPStrategy(state_dict_type="consolidated")
    with pytest.raises(torchinit.ArgumentTypeError, match="cpu_offload"):
        torchinit.FSDPStrategy(cpu_offload="yes")
    with pytest.raises(torchinit.ArgumentTypeError, match="mixed_precision"):
        torchinit.FSDPStrategy(mixed_precision=torch.bfloat16)
    with pytest.raises(TypeError, match="param_init_fn"):
        torchinit.FSDPStrategy(param_init_fn=lambda m: m)


def test_mixed_precision_given_is_fsdps_policy():
    from torchinit.strategies import fsdp

    plan = torchinit.Fabric(accelerator="cpu", strategy="fsdp").plan
    given = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    kwargs = fsdp._shard_kwargs(plan, dataclasses.replace(plan.options, mixed_precision=given), mesh=object())
    assert kwargs["mp_policy"] is given and kwargs["reshard_after_forward"] is True


def test_the_saved_layout_follows_the_arguments():
    def layout(strategy):
        return strategy_for(torchinit.Fabric(accelerator="cpu", strategy=strategy, devices=2).plan).layout

    assert layout("fsdp") is Layout.DCP and layout(torchinit.FSDPStrategy(state_dict_type="full")) is Layout.FULL
    assert layout(torchinit.ModelParallelStrategy(save_distributed_checkpoint=False)) is Layout.FULL
    assert layout(torchinit.ModelParallelStrategy()) is Layout.DCP
    assert Layout.FULL.sharded and Layout.DCP.sharded and not Layout.FILE.sharded


def test_ddp_arguments_and_lightnings_names():
    def options(strategy):
        return torchinit.Fabric(accelerator="cpu", strategy=strategy, devices=2).plan.options

    assert options("ddp") == torchinit.DDPStrategy() and options("auto") == torchinit.DDPStrategy()
    assert options("ddp_find_unused_parameters_true").find_unused_parameters
    assert options("ddp_spawn").start_method == "spawn"
    ddp = torchinit.DDPStrategy(static_graph=True, bucket_cap_mb=5, process_group_backend="gloo",
                                timeout=timedelta(seconds=30))
    assert ddp.ddp_kwargs() == dict(find_unused_parameters=False, static_graph=True, gradient_as_bucket_view=False,
                                    broadcast_buffers=True, bucket_cap_mb=5)
    assert torchinit.Fabric(accelerator="cpu", strategy=ddp, devices=2).plan.process_group == \
        ("gloo", timedelta(seconds=30))
    assert options("fsdp_cpu_offload").cpu_offload is True
    with pytest.raises(torchinit.ConfigurationError, match="never by forking"):
        torchinit.DDPStrategy(start_method="fork")
    with pytest.raises(torchinit.ArgumentTypeError, match="timedelta"):
        torchinit.DDPStrategy(timeout=30)
    with pytest.raises(torchinit.ArgumentTypeError, match="name a backend"):
        torchinit.FSDPStrategy(process_group_backend=dist_backend_object())
    with pytest.raises(torchinit.ConfigurationError, match="strategy='dp' is not supported"):
        torchinit.Fabric(accelerator="cpu", strategy="dp")
    assert torchinit.strategies.FSDPStrategy is torchinit.FSDPStrategy  # where Lightning keeps them


def dist_backend_object():
    return torch.distributed.Backend  # a class, not a backend's name


def test_deepspeed_config_from_lightnings_arguments():
    def config(precision="32-true", **kwargs):
        plan = torchinit.Fabric(accelerator="cpu", strategy=torchinit.DeepSpeedStrategy(**kwargs),
                                precision=precision).plan
        return deepspeed_config.config(plan, plan.options)

    offload = config(stage=3, offload_optimizer=True, offload_parameters=True, pin_memory=True)["zero_optimization"]
    assert offload["stage"] == 3 and offload["offload_optimizer"]["device"] == "cpu"
    assert offload["offload_param"] == {"device": "cpu", "nvme_path": "/local_nvme", "buffer_count": 5,
                                        "buffer_size": 100_000_000, "max_in_cpu": 1_000_000_000, "pin_memory": True}
    plan = torchinit.Fabric(accelerator="cpu", strategy="deepspeed_stage_3_offload_nvme").plan
    assert plan.options.remote_device == "nvme" and plan.options.offload_params_device == "nvme"
    cfg = config(logging_batch_size_per_gpu=4, reduce_bucket_size=7)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["zero_optimization"]["reduce_bucket_size"] == 7
    assert "fp16" not in cfg and "bf16" not in cfg
    assert config("16-true", loss_scale=128, hysteresis=3)["fp16"] == {
        "enabled": True, "loss_scale": 128, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 3,
        "min_loss_scale": 1}
    with pytest.raises(torchinit.ConfigurationError, match="zero_optimization=False"):
        torchinit.DeepSpeedStrategy(zero_optimization=False)
    with pytest.raises(torchinit.ArgumentTypeError, match="as a dict"):
        torchinit.DeepSpeedStrategy(config="ds.json")


def test_a_hybrid_mesh_torch_cannot_make_is_a_clear_error(monkeypatch):
    from torchinit.strategies import fsdp

    def refuse(*args, **kwargs):
        raise RuntimeError("no subgroups on this backend")

    monkeypatch.setattr(fsdp, "init_device_mesh", refuse)
    plan = torchinit.Fabric(accelerator="cpu", strategy=torchinit.FSDPStrategy(sharding_strategy="HYBRID_SHARD"),
                            devices=2).plan
    with pytest.raises(torchinit.UnsupportedError, match=r"2-D device mesh \(1, 2\).*no subgroups.*FULL_SHARD"):
        fsdp.device_mesh(plan)
