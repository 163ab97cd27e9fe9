"""The CUDA paths: bf16 autocast and channels_last, torch.compile as one graph, the on-device feeder, export on CUDA.

Marked ``gpu``: they run on CUDA and skip without it. ``MEDGAN_TEST_DEVICE=cpu`` runs the same tests on the CPU (the
CPU-sized GPU check does, so a GPU slot never meets a typo); the CUDA-only parts (inductor, TF32-free cuDNN) then
name what they leave out.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from medgan.config import Config, ModelConfig, TrainConfig
from medgan.data import DeviceFeeder
from medgan.dataset import SliceDataset, write_dataset
from medgan.export import export_dataset, read_image
from medgan.models.discriminator import Discriminator
from medgan.models.generator import CondBatchNorm, Generator, LoadedGenerator
from medgan.train import dist

pytestmark = pytest.mark.gpu

MODEL = ModelConfig(z_dim=16, width=8, g_max_channels=64, d_max_channels=64, d_reduce_channels=4, embed_dim=8)


@pytest.fixture(scope="module")
def device() -> torch.device:
    name = os.environ.get("MEDGAN_TEST_DEVICE", "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs CUDA (MEDGAN_TEST_DEVICE=cpu runs these tests on the CPU)")
    return torch.device(name)


@pytest.fixture(autouse=True)
def backend_flags():
    """`dist.setup` turns TF32 and cuDNN autotuning on for the process: give each test the flags it started with."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def networks(device: torch.device, memory_format=torch.contiguous_format) -> tuple[Generator, Discriminator]:
    torch.manual_seed(0)
    G = Generator.from_config(MODEL, 2).to(device, memory_format=memory_format)
    D = Discriminator.from_config(MODEL, 2).to(device, memory_format=memory_format)
    with torch.no_grad():  # fresh CBN is class-blind; random modulation makes classes (and any mix-up) visible
        for m in G.modules():
            if isinstance(m, CondBatchNorm):
                m.gain.weight.normal_(0, 0.3)
                m.bias.weight.normal_(0, 0.3)
    return G, D


def batch(device: torch.device, b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, MODEL.z_dim, generator=g).to(device), torch.arange(b).remainder(2).to(device)


def test_env_runs_bf16_autocast_and_channels_last_on_the_device(device):
    env = dist.setup(TrainConfig(device=str(device), precision="bf16", compile="auto", channels_last=True))
    assert env.device.type == device.type and env.dtype == torch.bfloat16
    assert env.compile == (device.type == "cuda")  # compile=auto: CUDA only
    G, D = networks(device, torch.channels_last)
    conv_weights = [p for p in list(G.parameters()) + list(D.parameters()) if p.dim() == 4 and p.shape[-1] > 1]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    z, y = batch(device)
    with env.autocast():
        fake = G(z, y)  # (6, 1, 128, 128)
        x = fake.float().contiguous(memory_format=torch.channels_last)
        features, logits = D.features(x), D(x, y)  # the projection head may promote the logits to fp32
    assert fake.dtype == torch.bfloat16 and features.dtype == torch.bfloat16, "autocast did not run bf16 kernels"
    assert fake.shape == (6, 1, 128, 128) and logits.shape == (6,)
    # The bf16 output is the fp32 output to bf16 accuracy (8 mantissa bits; errors add up over the layers).
    G32, _ = networks(device)
    G32.load_state_dict(G.state_dict())
    reference = G32(z, y)
    assert float((fake.detach().float() - reference.detach()).abs().max()) < 0.1
    assert not torch.equal(fake.float(), reference), "bf16 autocast gave fp32-exact pixels: it did not take effect"
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in G.parameters() if p.requires_grad)


def test_generator_and_discriminator_compile_as_one_graph(device):
    # fullgraph=True fails on any graph break; inductor on CUDA (what medgan runs), dynamo's eager backend on the CPU.
    backend = "inductor" if device.type == "cuda" else "eager"
    torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 on both sides: only fusion and ordering may differ
    exact = torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False)
    with exact:
        compare_compiled(device, backend)


def compare_compiled(device: torch.device, backend: str) -> None:
    G, D = networks(device)
    D_twin = copy.deepcopy(D)  # spectral norm's power iteration updates D on every call: compare from one state
    Gc, Dc = torch.compile(G, fullgraph=True, backend=backend), torch.compile(D_twin, fullgraph=True, backend=backend)
    z, y = batch(device)
    fake = G(z, y)
    torch.testing.assert_close(Gc(z, y), fake, atol=1e-4, rtol=1e-3)
    # The G step: D frozen, only the input gradient flows back (the loop's frozen-D pass, compiled).
    D.requires_grad_(False)
    D_twin.requires_grad_(False)
    x = fake.detach().requires_grad_(True)
    (grad_eager,) = torch.autograd.grad(D(x, y).sum(), x)
    (grad_compiled,) = torch.autograd.grad(Dc(x, y).sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager, atol=1e-4, rtol=1e-3)
    assert all(p.grad is None for p in D_twin.parameters()), "a frozen D built weight gradients"


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> SliceDataset:
    rng = np.random.default_rng(0)
    n = 40
    images = rng.uniform(-1, 1, (n, 1, 128, 128)).astype(np.float32)
    rows = [
        dict(split="train" if i < 32 else "val", label=i % 2, patient=f"p{i}", volume=f"v{i}", slice_index=0,
             position_mm=0.0, spacing_mm=1.0, modality="MR", seed="")
        for i in range(n)
    ]  # fmt: skip
    out = tmp_path_factory.mktemp("feeder") / "ds"
    write_dataset(out, images, rows, ["a", "b"])
    return SliceDataset.open(out)


def test_device_feeder_keeps_the_split_on_the_device_and_draws_batches_there(slices, device):
    feeder = DeviceFeeder(slices, device, seed=3)
    assert feeder.images.device.type == device.type and feeder.images.dtype == torch.float16
    assert len(feeder) == 32  # the train split only
    x, y = feeder.batch(images_seen=48, batch_per_rank=16)  # crosses the epoch boundary at 32
    assert x.device.type == device.type and x.dtype == torch.float32 and x.shape == (16, 1, 128, 128)
    rows = slices.indices("train")[feeder.indices(48, 16).cpu().numpy()]
    np.testing.assert_array_equal(x.cpu().numpy(), slices.images[rows].astype(np.float32))
    np.testing.assert_array_equal(y.cpu().numpy(), slices.labels[rows])
    x2, _ = DeviceFeeder(slices, device, seed=3).batch(48, 16)
    assert torch.equal(x, x2), "data order is not a pure function of (seed, images seen)"
    # Two DDP ranks take disjoint halves of each global batch.
    r0 = DeviceFeeder(slices, device, seed=3, rank=0, world_size=2).indices(0, 8)
    r1 = DeviceFeeder(slices, device, seed=3, rank=1, world_size=2).indices(0, 8)
    assert not set(r0.tolist()) & set(r1.tolist())
    assert sorted(r0.tolist() + r1.tolist()) == sorted(feeder.indices(0, 16).tolist())


def loaded_generator() -> LoadedGenerator:
    G, _ = networks(torch.device("cpu"))
    return LoadedGenerator(G.eval(), ["a", "b"], MODEL, info={"name": "gpu-test", "dataset_hash": "0" * 64})


def export_on(device: str, out, fmt: str = "png") -> SliceDataset:
    cfg = Config()
    cfg.export.format, cfg.export.n_per_class, cfg.export.batch_size, cfg.export.device = fmt, 6, 4, device
    cfg.export.workers = 1
    export_dataset(loaded_generator(), cfg, out, progress=False)
    return SliceDataset.open(out)


def test_export_on_the_device_matches_the_cpu_export_to_one_grey_level(device, tmp_path):
    on_device = export_on(str(device), tmp_path / "device")
    on_cpu = export_on("cpu", tmp_path / "cpu")
    assert on_device.meta["export"]["device"] == str(device)
    assert on_device.meta["counts"] == on_cpu.meta["counts"]
    # Kernels differ between devices in the last float32 bits: the float16 slices may differ by a float16 step,
    # an 8-bit PNG by one grey level where a value sits on a rounding boundary.
    diff = np.abs(on_device.images.astype(np.float32) - on_cpu.images.astype(np.float32))
    assert float(diff.max()) <= 2e-3
    files = sorted((tmp_path / "device" / "images").rglob("*.png"))
    assert len(files) == 12
    for f in files:
        a = read_image(f).astype(np.int64)
        b = read_image(tmp_path / "cpu" / f.relative_to(tmp_path / "device")).astype(np.int64)
        assert np.abs(a - b).max() <= 1, f.name
    # The same device twice gives the same bytes.
    again = export_on(str(device), tmp_path / "again")
    np.testing.assert_array_equal(again.images, on_device.images)
    for f in files:
        assert f.read_bytes() == (tmp_path / "again" / f.relative_to(tmp_path / "device")).read_bytes()
