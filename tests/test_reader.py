"""The safetensors reader's staged path: values that cannot be read in place (another dtype, another device, a
strided destination) go through a ring of small slots; exact bit for bit, bounded in memory, and as clear about
a bad file as the direct path."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import torchinit
from torchinit.checkpoint import safetensors as reader

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(autouse=True)
def small_slots(monkeypatch):
    monkeypatch.setattr(reader, "SLOT", 2**20)  # 1 MiB: large values span several slots, tests stay small


def values(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One value larger than several slots, many small ones of odd sizes that straddle slot boundaries, and the
    edge cases: a scalar, an empty tensor, the special floats."""
    g = torch.Generator().manual_seed(0)
    state = {"embedding": torch.randn(700, 1237, generator=g) * 37}  # 3.3 MiB in fp32
    for i in range(300):
        state[f"small.{i}"] = torch.randn(int(torch.randint(1, 3000, (1,), generator=g)), generator=g)
    state["scalar"] = torch.tensor(1 / 3)
    state["empty"] = torch.empty(0, 5)
    state["special"] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40, 3e38, 65519.0])
    return {k: v.to(dtype) for k, v in state.items()}


def read(path, targets: dict[str, torch.Tensor], threads: int = 4) -> int:
    entries, _ = reader.read_header(path)
    return reader.read_into([(entries[k], t) for k, t in targets.items()], threads)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit, except which NaN a cast makes (a GPU's conversion instruction makes another one than the CPU)."""
    got, want = got.cpu().contiguous(), want.contiguous()
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(BITS[got.itemsize])[~nan], want.view(BITS[want.itemsize])[~nan])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("file_dtype, dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_cast_and_staged_reads_are_exact(file_dtype, dtype, device, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(values(file_dtype), path)
    state = load_file(path)
    targets = {k: torch.full(v.shape, 7, dtype=dtype, device=device) for k, v in state.items()}
    assert read(path, targets) == sum(v.numel() * v.itemsize for v in state.values())
    for key, want in state.items():
        assert_same_bits(targets[key], want.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_destinations_get_their_elements_and_nothing_else(dtype, device, tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {"t": torch.randn(300, 500, generator=g),  # into a transpose
             "wide": torch.randn(3, 300_000, generator=g),  # one row (1.2 MB) is larger than a slot
             "cube": torch.randn(40, 50, 60, generator=g)}
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    backing = {"t": torch.zeros(500, 300), "wide": torch.zeros(300_000, 3), "cube": torch.zeros(60, 40, 100)}
    backing = {k: v.to(dtype=dtype, device=device) for k, v in backing.items()}
    targets = {"t": backing["t"].t(), "wide": backing["wide"].t(), "cube": backing["cube"][:, :, ::2].permute(1, 2, 0)}
    assert not any(t.is_contiguous() for t in targets.values())
    read(path, targets)
    for key, want in state.items():
        assert_same_bits(targets[key], want.to(dtype))
    assert not backing["cube"][:, :, 1::2].any()  # the columns between the destination's stayed as they were


def test_staging_stays_within_the_ring(monkeypatch, tmp_path):
    g = torch.Generator().manual_seed(2)
    state = {"big": torch.randn(4096, 1024, generator=g), **{f"w{i}": torch.randn(1000, 500, generator=g)
                                                              for i in range(4)}}  # 24 MiB of fp32
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    entries, _ = reader.read_header(path)
    pairs = [(entries[k], torch.empty(v.shape, dtype=torch.bfloat16)) for k, v in state.items()]
    allocated, empty = [], torch.empty

    def counting(*args, **kwargs):
        t = empty(*args, **kwargs)
        allocated.append(t.numel() * t.itemsize)
        return t

    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", counting)
        reader.read_into(pairs)
    staged = sum(v.numel() * v.itemsize for v in state.values())
    assert 0 < sum(allocated) <= 2 * reader.SLOT < staged / 10  # a synchronous cast needs two slots, no more
    for (_, got), want in zip(pairs, state.values(), strict=True):
        assert torch.equal(got, want.to(torch.bfloat16))


def test_a_slot_is_refilled_only_after_its_copy_is_done(monkeypatch, tmp_path):
    """The ring's contract with an asynchronous copier (CUDA's): a slot is read into again only once `free` for it
    has returned. This copier copies a slot only then (or at the end), as late as a GPU may."""

    class Late(reader._Copier):
        def __init__(self, verdicts=None):  # (no checks: the caller checks what it is not told about)
            self.pending = {}

        def free(self, k):
            for piece, source in self.pending.pop(k, []):
                piece.out.copy_(source)

        def send(self, k, slot, batch):
            self.pending[k] = [(piece, reader._staged(slot, piece)) for piece in batch]

        def finish(self):
            for k in list(self.pending):
                self.free(k)

    monkeypatch.setattr(reader, "_Copier", Late)
    path = tmp_path / "model.safetensors"
    save_file(values(torch.float32), path)
    state = load_file(path)
    targets = {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in state.items()}
    read(path, targets)
    for key, want in state.items():
        assert_same_bits(targets[key], want.to(torch.bfloat16))


def test_a_file_truncated_during_a_staged_read_is_named(monkeypatch, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(1000, 700), "b": torch.randn(1000, 700)}, path)
    entries, _ = reader.read_header(path)
    opened = reader._open

    def open_then_truncate(*args):  # after the file was checked to be the one whose header was read
        fd = opened(*args)
        os.truncate(path, path.stat().st_size - 1000)
        return fd

    monkeypatch.setattr(reader, "_open", open_then_truncate)
    targets = [(entries[k], torch.empty(1000, 700, dtype=torch.bfloat16)) for k in ("a", "b")]
    with pytest.raises(torchinit.CheckpointError, match=rf"{path.name}: ended early at byte \d+: the file is "
                                                        "truncated"):
        reader.read_into(targets)


def test_direct_io_reads_exactly_past_the_page_cache(monkeypatch, tmp_path):
    """O_DIRECT reads whole aligned blocks through a bounce buffer: values at any offset (after a 3-byte one),
    spanning bounce buffers and chunks, come out exact and checked, as from the page cache."""
    monkeypatch.setattr(reader, "BOUNCE", 3 * reader.BLOCK)
    monkeypatch.setattr(reader, "CHUNK", 5 * reader.BLOCK + 8)
    monkeypatch.setattr(reader, "PIECE", 4096)
    g = torch.Generator().manual_seed(3)
    state = {"a_odd": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),
             "b": torch.randn(30_001, generator=g), "c": torch.randn(7, 999, generator=g).bfloat16(),
             "d": torch.randn(5, generator=g).double()}
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError as error:
        pytest.skip(f"the filesystem of {tmp_path} does not take O_DIRECT ({error.strerror})")
    entries, _ = reader.read_header(path)
    assert entries["b"].start % 4 != 0 or entries["c"].start % reader.BLOCK != 0, "values off the block grid"
    targets = {k: torch.empty_like(v) for k, v in state.items()}
    verdicts = {}
    reader.read_into([(entries[k], t) for k, t in targets.items()], verdicts=verdicts, direct_io=True)
    for key, want in state.items():
        assert torch.equal(targets[key], want), key
    assert verdicts == {id(targets[k]): 0 for k in ("b", "c", "d")}
    state["c"][6, 998] = float("nan")
    save_file(state, path)
    model_path = tmp_path / "nan.safetensors"
    os.replace(path, model_path)
    with pytest.raises(torchinit.CheckpointError, match=f"{model_path}: c"):
        checkpoint = torchinit.open_checkpoint(model_path)
        checkpoint.direct_io = True
        checkpoint.load_into([(k, torch.empty_like(v)) for k, v in state.items()])
