"""Lightning Fabric 2.6's surface on one process: the behaviours Lightning tests for these methods (plugins, callbacks,
loggers, seeding, data loaders, clipping, collectives, setup wrappers, torch.compile, stateful save / load, launch)."""

import csv
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

import torchinit
from torchinit.loggers import CSVLogger, TensorBoardLogger


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture(autouse=True)
def seed_variables(monkeypatch):
    """seed_everything writes PL_GLOBAL_SEED / PL_SEED_WORKERS: each test starts without and leaves none behind."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.delenv("PL_SEED_WORKERS", raising=False)


def lightning_like(module: str, name: str):
    """An object whose class looks like Lightning's `module.name` (Lightning itself is not installed here)."""
    return type(name, (), {"__module__": module})()


def test_constructor_takes_lightnings_arguments_and_exposes_the_strategy():
    fabric = torchinit.Fabric(accelerator="cpu", strategy="auto", devices=1, num_nodes=1, precision=None, plugins=None,
                              callbacks=None, loggers=None)
    assert fabric.precision == "32-true" and fabric.strategy.precision.precision == "32-true"
    assert fabric._precision is fabric.strategy.precision
    assert fabric.strategy.root_device == fabric.device == torch.device("cpu")
    strategy = fabric.strategy
    assert (strategy.world_size, strategy.global_rank, strategy.is_global_zero) == (1, 0, True)
    assert (strategy.num_nodes, strategy.num_processes, strategy.distributed_sampler_kwargs) == (1, 1, None)
    assert fabric.accelerator == "cpu" and str(fabric.accelerator) == "cpu"
    assert fabric.loggers == [] and fabric.node_rank == 0
    with pytest.warns(UserWarning, match="using 'bf16-mixed'"):
        assert torchinit.Fabric(accelerator="cpu", precision="16-mixed").precision == "bf16-mixed"


def test_plugins_are_understood_or_refused_by_name():
    env = lightning_like("lightning.fabric.plugins.environments.lightning", "LightningEnvironment")
    assert torchinit.Fabric(accelerator="cpu", plugins=env)._plugins == [env]
    bnb = lightning_like("lightning.fabric.plugins.precision.bitsandbytes", "BitsandbytesPrecision")
    with pytest.raises(RuntimeError, match="BitsandbytesPrecision.*precision plugins are not supported"):
        torchinit.Fabric(accelerator="cpu", plugins=[bnb])
    slurm = lightning_like("lightning.fabric.plugins.environments.slurm", "SLURMEnvironment")
    with pytest.raises(RuntimeError, match="SLURMEnvironment is not supported"):
        torchinit.Fabric(accelerator="cpu", plugins=[slurm])
    with pytest.raises(TypeError, match=r"plugins=\[TorchCheckpointIO\(\.\.\.\)\]\) is not supported"):
        torchinit.Fabric(accelerator="cpu", plugins=lightning_like("lightning.fabric.plugins.io", "TorchCheckpointIO"))


class Recorder:
    def __init__(self):
        self.calls = []

    def on_train_epoch_end(self, results):  # a keyword it does not accept is filtered out
        self.calls.append(("epoch_end", results))

    def on_after_setup(self, fabric, module):
        self.calls.append(("setup", type(module).__name__))

    def on_after_optimizer_step(self, strategy, optimizer):
        self.calls.append(("step", type(optimizer).__name__))


def test_callbacks_are_called_with_the_keywords_they_accept():
    first, second = Recorder(), Recorder()
    second.on_train_epoch_end = 3  # not callable: skipped with a warning
    fabric = torchinit.Fabric(accelerator="cpu", callbacks=[first, second])
    with pytest.warns(UserWarning, match="not callable"):
        fabric.call("on_train_epoch_end", results={"loss": 1}, unused=2)
    fabric.call("a_hook_nobody_has")
    model, optimizer = fabric.setup(module := small(), torch.optim.SGD(module.parameters(), lr=0.1))
    fabric.backward(model(torch.randn(2, 4)).sum())
    optimizer.step()
    assert first.calls == [("epoch_end", {"loss": 1}), ("setup", "FabricModule"), ("step", "SGD")]
    assert torchinit.Fabric(accelerator="cpu", callbacks=first)._callbacks == [first]


class ListLogger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((metrics, step))


def test_log_and_log_dict_reach_every_logger_as_numbers():
    a, b = ListLogger(), ListLogger()
    fabric = torchinit.Fabric(accelerator="cpu", loggers=[a, b])
    assert fabric.logger is a and fabric.loggers == [a, b]
    fabric.log("loss", torch.tensor(2.5, requires_grad=True), step=3)
    fabric.log_dict({"a": 1, "b": torch.tensor([4.0])})
    assert a.logged == b.logged == [({"loss": 2.5}, 3), ({"a": 1, "b": 4.0}, None)]
    with pytest.raises(ValueError, match="'v' is a tensor of 2 elements"):
        fabric.log("v", torch.zeros(2))
    assert torchinit.Fabric(accelerator="cpu", loggers=a).loggers == [a]


def test_csv_logger_writes_lightnings_layout(tmp_path):
    logger = CSVLogger(tmp_path, name="run", flush_logs_every_n_steps=2)
    assert logger.version == 0 and logger.log_dir == str(tmp_path / "run" / "version_0")
    logger.log_metrics({"loss": torch.tensor(1.0)}, step=0)
    assert not os.path.exists(logger.metrics_file_path)  # not flushed yet
    logger.log_metrics({"loss": 0.5}, step=1)
    logger.log_metrics({"loss": 0.25, "acc": 0.75}, step=2)  # a new column: the file is rewritten with it
    logger.finalize("success")
    with open(logger.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"acc": "", "loss": "1.0", "step": "0"}, {"acc": "", "loss": "0.5", "step": "1"},
                    {"acc": "0.75", "loss": "0.25", "step": "2"}]
    assert CSVLogger(tmp_path, name="run").version == 1 and CSVLogger(tmp_path, version="x").log_dir.endswith("x")
    prefixed = CSVLogger(tmp_path, name="p", prefix="train")
    prefixed.log_metrics({"loss": 1.0})
    prefixed.save()
    with open(prefixed.metrics_file_path) as f:
        assert next(csv.reader(f)) == ["step", "train-loss"]
    with pytest.raises(RuntimeError, match="does not log hyperparameters"):
        prefixed.log_hyperparams({"lr": 1})


def test_tensorboard_logger_writes_events_or_says_what_is_missing(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs the `tensorboard` package"):
            TensorBoardLogger(tmp_path)
        return
    logger = TensorBoardLogger(tmp_path, name="tb", sub_dir="train")
    assert logger.log_dir == str(tmp_path / "tb" / "version_0" / "train")
    logger.log_metrics({"loss": torch.tensor(0.5)}, step=1)
    logger.log_hyperparams({"lr": 0.1, "layers": [1, 2]})
    logger.finalize("success")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == [0.5] and "hp_metric" in events.Tags()["scalars"]


def test_seed_everything_function_and_method():
    assert torchinit.seed_everything(7) == 7 and os.environ["PL_GLOBAL_SEED"] == "7"
    assert os.environ["PL_SEED_WORKERS"] == "0"
    first = torch.rand(3)
    torchinit.seed_everything(7)
    assert torch.equal(torch.rand(3), first)
    assert torchinit.seed_everything() == 7  # None: the seed in PL_GLOBAL_SEED
    assert torchinit.Fabric.seed_everything(8) == 8 and os.environ["PL_SEED_WORKERS"] == "1"  # the method seeds workers
    torchinit.Fabric(accelerator="cpu").seed_everything(9, workers=False)
    assert os.environ["PL_SEED_WORKERS"] == "0"
    with pytest.raises(ValueError, match="not in bounds"):
        torchinit.seed_everything(-1)
    os.environ["PL_GLOBAL_SEED"] = "nope"
    with pytest.raises(ValueError, match="Invalid seed specified via PL_GLOBAL_SEED"):
        torchinit.seed_everything()
    del os.environ["PL_GLOBAL_SEED"]
    with pytest.warns(UserWarning, match="No seed found, seed set to 0"):
        assert torchinit.seed_everything() == 0


class EpochSampler(Sampler):
    def __init__(self):
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(range(4))

    def __len__(self):
        return 4


def test_setup_dataloaders_on_one_process():
    fabric = torchinit.Fabric(accelerator="cpu")
    sampler = EpochSampler()
    loader = DataLoader(list(range(4)), sampler=sampler, batch_size=2)
    wrapped = fabric.setup_dataloaders(loader)
    assert wrapped.sampler is sampler and len(wrapped) == 2 and wrapped.device == fabric.device
    assert [b.tolist() for b in wrapped] == [[0, 1], [2, 3]]
    list(wrapped)
    assert sampler.epochs == [0, 1]  # a new epoch every pass
    a, b = fabric.setup_dataloaders(DataLoader([1]), DataLoader([2]), move_to_device=False)
    assert a.device is None and list(b) == [torch.tensor([2])]
    with pytest.raises(ValueError, match="at least one dataloader"):
        fabric.setup_dataloaders()
    with pytest.raises(ValueError, match="only once"):
        fabric.setup_dataloaders(wrapped)
    with pytest.raises(TypeError, match="Only PyTorch DataLoader"):
        fabric.setup_dataloaders([1, 2])


def test_to_device_moves_collections_and_modules():
    fabric = torchinit.Fabric(accelerator="cpu")
    data = {"x": [torch.ones(1, dtype=torch.float64)], "n": 3, "s": "text"}
    assert fabric.to_device(data) == {"x": [torch.ones(1, dtype=torch.float64)], "n": 3, "s": "text"}
    module = nn.Linear(1, 1)
    assert fabric.to_device(module) is module


def test_collectives_on_one_process_follow_lightning():
    fabric = torchinit.Fabric(accelerator="cpu")
    t = torch.tensor([1.0, 2.0])
    assert fabric.all_reduce(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    reduced = fabric.all_reduce({"a": 3, "b": [t]}, reduce_op="sum")
    assert torch.equal(reduced["a"], torch.tensor(3)) and reduced["b"][0] is t
    assert torch.equal(fabric.all_gather(t), t)  # one process: no extra dimension
    assert torch.equal(fabric.all_gather(2.0), torch.tensor(2.0))
    assert fabric.broadcast({"x": 1}) == {"x": 1}
    fabric.barrier("name")
    ran = []
    with fabric.rank_zero_first(local=True):
        ran.append(1)
    assert ran == [1]


def test_clip_gradients_matches_torch_and_unscales_first():
    fabric = torchinit.Fabric(accelerator="cpu")
    model, optimizer = fabric.setup(module := small(), torch.optim.SGD(module.parameters(), lr=0.1))
    fabric.backward(model(torch.randn(8, 4)).pow(2).sum())
    twin = [p.grad.clone() for p in module.parameters()]
    params = [nn.Parameter(torch.zeros_like(g)) for g in twin]
    for p, g in zip(params, twin, strict=True):
        p.grad = g.clone()
    want = torch.nn.utils.clip_grad_norm_(params, max_norm=0.1, norm_type=2.0)
    got = fabric.clip_gradients(model, optimizer, max_norm=0.1)
    assert torch.equal(got, want) and all(torch.equal(p.grad, q.grad) for p, q in zip(module.parameters(), params,
                                                                                         strict=True))
    assert fabric.clip_gradients(model, optimizer, clip_val=1e-3) is None
    assert all(p.grad.abs().max() <= 1e-3 for p in module.parameters())
    with pytest.raises(ValueError, match="Only one of `clip_val` or `max_norm`"):
        fabric.clip_gradients(model, optimizer, clip_val=1, max_norm=1)
    with pytest.raises(ValueError, match="either `clip_val` or `max_norm`"):
        fabric.clip_gradients(model, optimizer)
    module[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
    assert fabric.clip_gradients(model, optimizer, max_norm=1.0, error_if_nonfinite=False).isnan()
    # a grad scaler's gradients are unscaled before the norm is taken (16-mixed; a CPU scaler shows it here)
    scaled = torchinit.Fabric(accelerator="cpu", precision="bf16-mixed")
    scaled.strategy.precision.scaler = torch.amp.GradScaler("cpu")
    model, optimizer = scaled.setup(module := small(), torch.optim.SGD(module.parameters(), lr=0.1))
    loss = model(torch.randn(8, 4)).sum()
    scaled.backward(loss)
    unscaled = [p.grad / 65536 for p in module.parameters()]
    norm = scaled.clip_gradients(model, optimizer, max_norm=1e9)
    assert torch.equal(norm, torch.nn.utils.get_total_norm(unscaled)), "the norm of the unscaled gradients"


def test_backward_passes_arguments_and_accepts_model():
    fabric = torchinit.Fabric(accelerator="cpu")
    model = fabric.setup(small())
    loss = model(torch.randn(2, 4)).sum()
    fabric.backward(loss, retain_graph=True, model=model)
    fabric.backward(loss, None, False)  # positional: gradient, retain_graph
    assert model.module[0].weight.grad is not None


def test_no_backward_sync_needs_a_set_up_module():
    fabric = torchinit.Fabric(accelerator="cpu")
    with pytest.raises(TypeError, match="set up the model first"):
        fabric.no_backward_sync(small())
    with fabric.no_backward_sync(fabric.setup(small())):
        pass


class WithStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def forward(self, x):
        return self.layer(x)

    def generate(self, x):
        return self.layer(x) * 2


def test_setup_wrappers_expose_lightnings_attributes():
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true")
    module = WithStep()
    optimizer = torch.optim.AdamW(module.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    model, opt, sched = fabric.setup(module, optimizer, scheduler=scheduler)
    assert model.module is module and opt.optimizer is optimizer and sched is scheduler
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups is optimizer.param_groups
    model.new_attribute = 5  # set on the original module
    assert module.new_attribute == 5 and model.new_attribute == 5
    model.mark_forward_method("generate")  # one device: forward runs through the module itself, no redirection
    assert model.generate(torch.ones(1, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cannot mark the forward method"):
        model.mark_forward_method("forward")
    with pytest.raises(RuntimeError, match="'missing' as a forward method"):
        model.mark_forward_method("missing")
    with pytest.raises(TypeError, match="method or its name"):
        model.mark_forward_method(3)
    with pytest.raises(ValueError, match="passed only once"):
        fabric.setup(model)
    with pytest.raises(ValueError, match="optimizer should be passed only once"):
        fabric.setup(WithStep(), opt)
    with pytest.raises(ValueError, match="optimizer should be passed only once"):
        fabric.setup_optimizers(opt)
    with pytest.raises(ValueError, match="at least one optimizer"):
        fabric.setup_optimizers()


def test_a_compiled_module_is_set_up_underneath_and_compiled_again():
    fabric = torchinit.Fabric(accelerator="cpu")
    module = small()
    compiled = torch.compile(module, backend="eager")
    model = fabric.setup(compiled)
    from torch._dynamo.eval_frame import OptimizedModule

    assert model.module is module and isinstance(model.forward_module, OptimizedModule)
    assert model.forward_module._orig_mod is module
    assert list(model.state_dict()) == list(module.state_dict())  # no "_orig_mod." prefix
    x = torch.randn(3, 4)
    assert torch.equal(model(x), module(x))
    kept = fabric.setup(torch.compile(small(), backend="eager"), _reapply_compile=False)
    assert isinstance(kept.module, OptimizedModule)


def test_save_and_load_restore_stateful_objects_in_place(tmp_path):
    fabric = torchinit.Fabric(accelerator="cpu")
    model, optimizer = fabric.setup(module := small(), torch.optim.SGD(module.parameters(), lr=1.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 0.5 ** step)  # a lambda: not
    for _ in range(3):  # picklable, saved as its state
        optimizer.step()
        scheduler.step()
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 3}
    fabric.save(tmp_path / "ckpt.pt", {**state, "extra": "kept"})
    fresh_module = small()
    fresh_opt = torch.optim.SGD(fresh_module.parameters(), lr=1.0)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda step: 0.5 ** step)
    target = {"model": fresh_module, "optimizer": fresh_opt, "scheduler": fresh_sched, "step": 0}
    rest = fabric.load(tmp_path / "ckpt.pt", target)
    assert rest == {"extra": "kept"} and target["step"] == 3
    assert target["scheduler"] is fresh_sched and fresh_sched.last_epoch == 3
    assert fresh_opt.param_groups[0]["lr"] == 0.125
    raw = fabric.load(tmp_path / "ckpt.pt")
    assert isinstance(raw["scheduler"], dict) and raw["scheduler"]["last_epoch"] == 3


def test_save_filter_keeps_what_it_accepts(tmp_path):
    fabric = torchinit.Fabric(accelerator="cpu")
    model = fabric.setup(small())
    fabric.save(tmp_path / "f.pt", {"model": model, "meta": {"a": 1, "b": 2}},
                filter={"model": lambda name, _: name.endswith("weight"), "meta": lambda name, _: name == "a"})
    saved = torch.load(tmp_path / "f.pt", weights_only=True)
    assert list(saved["model"]) == ["0.weight", "2.weight"] and saved["meta"] == {"a": 1}
    with pytest.raises(TypeError, match="Filter should be a dictionary"):
        fabric.save(tmp_path / "g.pt", {"model": model}, filter=[1])
    with pytest.raises(ValueError, match=r"filter keys \['nope'\] are not present"):
        fabric.save(tmp_path / "g.pt", {"model": model}, filter={"nope": lambda *_: True})
    with pytest.raises(TypeError, match="to be a callable"):
        fabric.save(tmp_path / "g.pt", {"model": model}, filter={"model": 1})


def job(fabric, x, scale=1):
    return type(fabric).__name__, fabric.note, x * scale


class Noted(torchinit.Fabric):
    note = "class attribute"


def test_launch_passes_the_fabric_args_and_kwargs():
    fabric = Noted(accelerator="cpu")
    assert fabric.launch(job, 2, scale=3) == ("Noted", "class attribute", 6)
    with pytest.raises(TypeError, match="needs to be a callable"):
        fabric.launch(job(fabric, 1))
    with pytest.raises(TypeError, match="needs to take at least one argument"):
        fabric.launch(lambda: None)


def test_print_on_local_rank_zero(capsys):
    torchinit.Fabric(accelerator="cpu").print("hello", end="!")
    assert capsys.readouterr().out == "hello!"
