"""Lightning's own strategy objects handed to torchinit.Fabric (as litgpt does): each argument carried over, or the
object refused naming it. Skipped where lightning is not installed."""

from datetime import timedelta

import pytest
import torch
from dist_workers import tiny_llama
from strategy_workers import lightning_fsdp_training
from torch.distributed.fsdp import MixedPrecision, MixedPrecisionPolicy

import torchinit
from torchinit.models.llama import Block
from torchinit.strategies import deepspeed_config
from torchinit.strategies.policies import picked

strategies = pytest.importorskip("lightning.fabric.strategies")


def options(strategy, devices=2, **kwargs):
    return torchinit.Fabric(accelerator="cpu", strategy=strategy, devices=devices, **kwargs).plan.options


def test_litgpts_fsdp_strategy_is_carried_over():
    got = options(strategies.FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block},
                                          state_dict_type="full", limit_all_gathers=True, cpu_offload=False))
    assert isinstance(got, torchinit.FSDPStrategy)
    assert got.state_dict_type == "full" and got.cpu_offload is False and got.sharding_strategy == "FULL_SHARD"
    model = tiny_llama()
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    assert picked(model, got.auto_wrap_policy) == blocks, "Lightning's ModuleWrapPolicy picks the Blocks"
    assert picked(model, got.activation_checkpointing_policy) == blocks
    assert got.timeout is None, "Lightning's default timeout is torchinit's default"


def test_fsdp_arguments_one_by_one():
    got = options(strategies.FSDPStrategy(
        sharding_strategy="HYBRID_SHARD", device_mesh=(2, 1), cpu_offload=True, timeout=timedelta(seconds=9),
        mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        process_group_backend="gloo", activation_checkpointing=[Block], sync_module_states=True))
    assert got.sharding_strategy == "HYBRID_SHARD" and got.device_mesh == (2, 1) and got.cpu_offload is True
    assert got.mixed_precision == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert got.timeout == timedelta(seconds=9) and got.process_group_backend == "gloo" and got.sync_module_states
    assert picked(tiny_llama(), got.activation_checkpointing_policy)[0][0] == "layers.0"
    assert options(strategies.FSDPStrategy(sharding_strategy="SHARD_GRAD_OP")).resharded is False


@pytest.mark.parametrize(("kwargs", "named"), [
    (dict(param_init_fn=lambda m: m), "param_init_fn"),
    (dict(forward_prefetch=True), "forward_prefetch"),
    (dict(ignored_modules=[]), "ignored_modules"),
    (dict(use_orig_params=False), "use_orig_params"),
    (dict(mixed_precision=MixedPrecision(buffer_dtype=torch.bfloat16)), "buffer_dtype"),
    (dict(parallel_devices=[torch.device("cpu")] * 2), "parallel_devices"),
])
def test_fsdp_arguments_without_a_counterpart_are_refused_by_name(kwargs, named):
    with pytest.raises(torchinit.ConfigurationError, match=named):
        options(strategies.FSDPStrategy(**kwargs))


def test_backward_prefetch_before_is_fsdp2s_and_after_is_refused():
    from torch.distributed.fsdp import BackwardPrefetch

    assert options(strategies.FSDPStrategy(backward_prefetch=BackwardPrefetch.BACKWARD_PRE)).sharding_strategy
    with pytest.raises(torchinit.ConfigurationError, match="backward_prefetch"):
        options(strategies.FSDPStrategy(backward_prefetch=BackwardPrefetch.BACKWARD_POST))


def test_plugins_inside_a_strategy_are_refused():
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.fabric.plugins.precision import FSDPPrecision

    with pytest.raises(torchinit.ConfigurationError, match=r"precision=\.\.\.\) .*pass precision= to Fabric"):
        options(strategies.FSDPStrategy(precision=FSDPPrecision("bf16-mixed")))
    with pytest.raises(torchinit.ConfigurationError, match="cluster_environment"):
        options(strategies.DDPStrategy(cluster_environment=LightningEnvironment()))


def test_ddp_strategy_is_carried_over():
    got = options(strategies.DDPStrategy(find_unused_parameters=True, static_graph=True, start_method="spawn"))
    assert got == torchinit.DDPStrategy(find_unused_parameters=True, static_graph=True, start_method="spawn")
    with pytest.raises(torchinit.ConfigurationError, match="init_sync"):
        options(strategies.DDPStrategy(init_sync=False))
    with pytest.raises(torchinit.ConfigurationError, match="never by forking"):
        options(strategies.DDPStrategy(start_method="fork"))


def test_deepspeed_strategy_builds_lightnings_config():
    theirs = strategies.DeepSpeedStrategy(stage=3, offload_optimizer=True, offload_parameters=True, pin_memory=True,
                                          reduce_bucket_size=7, loss_scale=64, remote_device="cpu")
    ours = torchinit.DeepSpeedStrategy(stage=3, offload_optimizer=True, offload_parameters=True, pin_memory=True,
                                       reduce_bucket_size=7)
    assert deepspeed_config.lightning_config(ours) == theirs.config, "the same config from the same arguments"
    got = options(theirs)
    assert got.stage == 3 and got.config == theirs.config and got.loss_scale == 64 and got.remote_device == "cpu"
    with pytest.raises(torchinit.ConfigurationError, match="zero_optimization"):
        options(strategies.DeepSpeedStrategy(zero_optimization=False))


def test_model_parallel_and_single_device_strategies_are_carried_over():
    def parallelize(model, mesh):
        return model

    got = options(strategies.ModelParallelStrategy(parallelize, data_parallel_size=1, tensor_parallel_size=2,
                                                   save_distributed_checkpoint=False))
    assert (got.parallelize_fn, got.data_parallel_size, got.tensor_parallel_size) == (parallelize, 1, 2)
    assert got.save_distributed_checkpoint is False
    fabric = torchinit.Fabric(accelerator="cpu", strategy=strategies.SingleDeviceStrategy("cpu"))
    assert fabric.plan.strategy == "single_device"


def test_other_lightning_strategies_are_refused_by_name():
    with pytest.raises(torchinit.ConfigurationError, match="DataParallelStrategy has no torchinit counterpart"):
        options(strategies.DataParallelStrategy())

    class Mine(strategies.FSDPStrategy):
        pass

    with pytest.raises(torchinit.ConfigurationError, match="derives from Lightning's FSDPStrategy"):
        options(Mine())
    trainer = pytest.importorskip("lightning.pytorch.strategies")
    with pytest.raises(torchinit.ConfigurationError, match="Trainer strategy"):
        options(trainer.DDPStrategy())


def test_a_lightning_fsdp_strategy_runs(tmp_path):
    """Lightning's object, as litgpt makes it, through launch, setup, a step and a full save."""
    fabric = torchinit.Fabric(accelerator="cpu", devices=2, strategy=strategies.FSDPStrategy(
        auto_wrap_policy={Block}, activation_checkpointing_policy={Block}, state_dict_type="full"))
    path = tmp_path / "lit_model.pth"
    assert fabric.launch(lightning_fsdp_training, path) is True, "the Blocks were checkpointed"
    saved = torch.load(path, weights_only=True)
    assert saved["model"].keys() == tiny_llama().state_dict().keys() and saved["iter_num"] == 1

