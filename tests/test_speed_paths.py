"""The speed paths, checked on the CPU: which device rules apply where, the teacher kept in bf16, and
GPU JPEG decoding (run here with torchvision's CPU decoder in place of nvJPEG) with its fallbacks."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data_setup
import engine
import experiment
import KD_engine
import model_builder
from config import command_line
from core import compute
from data import decoding, epoch_plan

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("setting, device, steps, expected", [
    ("auto", CUDA, compute.COMPILE_AUTO_MIN_STEPS, True),
    ("auto", CUDA, compute.COMPILE_AUTO_MIN_STEPS - 1, False),  # too short to pay for compiling
    ("auto", CPU, 10**9, False),
    ("on", CPU, 0, True),
    ("off", CUDA, 10**9, False),
])
def test_compile_rule(setting, device, steps, expected):
    assert compute.resolve_compile(setting, device, steps) is expected


def _dkd_epochs(step_of, epochs: int = 2) -> tuple[list[dict], KD_engine.DistillationStep, torch.nn.Module]:
    """`epochs` epochs of DKD with a tiny model (3 full batches an epoch: the partial one is dropped), the
    criterion wrapped by `step_of`; the epochs' metrics, the criterion and the trained student."""
    torch.manual_seed(0)
    student, teacher = (torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                            torch.nn.Linear(8, 4)) for _ in range(2))
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = data_setup.ImageTensors(images, torch.arange(40) % 4, [str(i) for i in range(40)], 16)
    loader = data_setup.BatchLoader(data, 12, [0.5] * 3, [0.25] * 3, CPU, data_setup.Augmentation(2, True))
    loader.drop_last = True
    setup = KD_engine.library_setup(steps_per_epoch=len(loader), dkd_warmup_epochs=2)  # 6 steps
    criterion = KD_engine.make_criterion("dkd", teacher, student, setup)
    step, optimizer = step_of(criterion), torch.optim.SGD(student.parameters(), lr=0.1)
    history = []
    for epoch in range(1, epochs + 1):
        step.set_epoch(epoch)
        history.append(engine.train_one_epoch(student, loader, step, optimizer, list("abcd"), CPU))
    return history, criterion, student


def test_a_compiled_step_is_one_graph_for_every_step_and_epoch(monkeypatch):
    """DKD's warm-up factor changes every step and the epoch's last batch would be smaller: neither may
    compile the step anew (checked with TorchDynamo's graphs, without a code generator: backend eager)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, criterion, _ = _dkd_epochs(lambda criterion: compute.CompiledStep(criterion, CPU), epochs=1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 1 and criterion.method.step == 3
    eager, _, _ = _dkd_epochs(lambda criterion: criterion, epochs=1)
    assert compiled[0]["warmup"] == eager[0]["warmup"] == pytest.approx((1 + 2 + 3) / 3 / 6)


def test_a_failed_compile_falls_back_to_eager_with_one_line(monkeypatch):
    def failing_compile(function, **options):
        def call(*args, **kwargs):
            raise RuntimeError("simulated compiler failure.\nLong details that the line leaves out")
        return call

    eager, eager_criterion, eager_student = _dkd_epochs(lambda criterion: criterion)
    monkeypatch.setattr(torch, "compile", failing_compile)
    lines = []
    fallen_back, criterion, student = _dkd_epochs(lambda criterion: compute.CompiledStep(criterion, CPU,
                                                                                           log=lines.append))
    assert lines == ["torch.compile failed (RuntimeError: simulated compiler failure); training continues "
                     "without compiling"]
    # The failed step counted once.
    assert fallen_back == eager and criterion.method.step == eager_criterion.method.step == 6
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), eager_student.state_dict().values(),
                                                 strict=True))


def test_compile_flag_is_tri_state():
    parser = command_line.build_parser(experiment.default_config())
    assert parser.parse_args([]).compile == "auto"
    assert parser.parse_args(["--compile"]).compile == "on"
    assert parser.parse_args(["--compile", "off"]).compile == "off"


def test_cudnn_autotuning_only_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    compute.enable_autotuning(CPU)
    assert torch.backends.cudnn.benchmark is False
    compute.enable_autotuning(CUDA)
    assert torch.backends.cudnn.benchmark is True


def test_gpu_decoding_only_for_cuda():
    assert decoding.gpu_decoding(CUDA) and decoding.gpu_decoding(torch.device("cuda", 1))
    assert not decoding.gpu_decoding(CPU) and not decoding.gpu_decoding(None)


def test_to_device_leaves_cpu_tensors_as_they_are():
    index = torch.arange(5)
    assert epoch_plan.to_device(index, CPU) is index


def test_a_teacher_stored_for_autocast_gives_the_same_logits_bit_for_bit():
    torch.manual_seed(0)
    teacher = model_builder.build_model("VGG16", 3, 32).eval().to(memory_format=torch.channels_last)
    for module in teacher.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # statistics as after training
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def logits() -> torch.Tensor:
        with torch.inference_mode(), compute.autocast(CPU, torch.bfloat16):
            return teacher(images)

    before = logits()
    compute.store_for_autocast(teacher, torch.bfloat16)
    assert teacher.features[0].weight.dtype == torch.bfloat16 and teacher.features[1].weight.dtype == torch.float32
    assert torch.equal(logits(), before)
    fp32_teacher = model_builder.build_model("VGG16", 3, 32)
    assert compute.store_for_autocast(fp32_teacher, None).features[0].weight.dtype == torch.float32


def _photo(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: size[1], : size[0]]
    smooth = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) * 127 // sum(size)], axis=-1)
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def mixed_folder(tmp_path) -> dict[str, Path]:
    """One file of each kind the GPU path must tell apart."""
    files = {
        "rgb": tmp_path / "rgb.jpg", "rgb_large": tmp_path / "rgb_large.jpeg", "grey": tmp_path / "grey.jpg",
        "cmyk": tmp_path / "cmyk.jpg", "png": tmp_path / "image.png", "truncated": tmp_path / "truncated.jpg",
        "text": tmp_path / "notes.jpg", "empty": tmp_path / "empty.jpg",
    }
    Image.fromarray(_photo((16, 16), 0)).save(files["rgb"], quality=90)
    Image.fromarray(_photo((40, 28), 1)).save(files["rgb_large"], quality=90)
    Image.fromarray(_photo((16, 16), 2)[..., 0]).save(files["grey"], quality=90)
    Image.fromarray(_photo((16, 16), 3)).convert("CMYK").save(files["cmyk"], quality=90)
    Image.fromarray(_photo((16, 16), 4)).save(files["png"])
    complete = files["rgb_large"].read_bytes()
    files["truncated"].write_bytes(complete[: len(complete) * 2 // 3])
    files["text"].write_text("not an image")
    files["empty"].write_bytes(b"")
    return files


def test_only_complete_rgb_or_grey_jpegs_go_to_the_gpu_decoder(mixed_folder):
    for kind, path in mixed_folder.items():
        data = decoding.gpu_jpeg_bytes(str(path))
        assert (data is not None) == (kind in ("rgb", "rgb_large", "grey")), kind
        if data is not None:
            assert data.dtype == torch.uint8 and bytes(data.numpy()) == path.read_bytes()
    assert decoding.gpu_jpeg_bytes(str(mixed_folder["rgb"].parent / "missing.jpg")) is None


def _checked(paths, decode_device, resize="squash"):
    """Every batch of decoded_batches for `paths` in a shuffled order: {index: image}, {index: reason}."""
    order = [[5, 1, 7], [0, 6, 3], [2, 4]]
    images, failed = {}, {}
    for batch, (decoded, failures) in zip(
            order, decoding.decoded_batches(paths, 16, 0, resize, decode_device, batch_sampler=order), strict=True):
        good = [index for index in batch if index not in failures]
        assert decoded is None or len(decoded) == len(good)
        images.update(zip(good, [] if decoded is None else decoded, strict=True))
        failed.update(failures)
    return images, failed


@pytest.mark.parametrize("resize", ["squash", "center-crop"])
def test_gpu_path_keeps_the_cpu_paths_images_order_and_skip_reasons(mixed_folder, monkeypatch, resize):
    paths = [str(path) for path in mixed_folder.values()]
    pil_images, pil_failed = _checked(paths, None, resize)
    monkeypatch.setattr(decoding, "gpu_decoding", lambda device: device is not None)  # the CUDA path, on the CPU
    tensor_images, tensor_failed = _checked(paths, CPU, resize)
    assert tensor_failed == pil_failed and set(pil_failed) == {5, 6, 7}  # truncated, text, empty
    assert tensor_images.keys() == pil_images.keys()
    names = list(mixed_folder)
    for index, image in tensor_images.items():
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
        difference = (image.int() - pil_images[index].int()).abs().float().mean().item()
        if names[index] in ("cmyk", "png"):  # not JPEGs for the GPU decoder: Pillow's pixels exactly
            assert difference == 0, names[index]
        else:  # another decoder (and resize) for the same picture
            assert difference < 4, names[index]


def test_a_jpeg_the_gpu_decoder_refuses_goes_through_pillow(mixed_folder, monkeypatch):
    """nvJPEG fails a whole batch for one file it cannot take: each file is retried alone, and the
    refused one is decoded by Pillow, exactly as on the CPU."""
    refused = mixed_folder["rgb"].read_bytes()
    original = torchvision.io.decode_jpeg

    def picky_decoder(data, *args, **kwargs):
        if isinstance(data, list) or bytes(data.numpy()) == refused:
            raise RuntimeError("nvjpegDecodeBatched failed")
        return original(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky_decoder)
    monkeypatch.setattr(decoding, "gpu_decoding", lambda device: device is not None)
    paths = [str(mixed_folder[kind]) for kind in ("grey", "rgb", "truncated")]
    images, failed = _checked(paths * 3, CPU)
    assert torch.equal(images[1], decoding.decode_image(paths[1], 16))
    assert (images[0].float() - decoding.decode_image(paths[0], 16).float()).abs().mean() < 4
    assert failed[2].startswith("truncated image") or failed[2].startswith("damaged image")


def test_gpu_decoded_streaming_and_in_memory_batches_are_identical(tmp_path, monkeypatch):
    """With GPU decoding (here on the CPU) the first decode and the streamed epochs use the same
    decoder, so their batches stay identical; its decode cache is kept apart from Pillow's."""
    for split, count in (("train", 10), ("test", 4)):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(_photo((20 + i, 20), i + 7 * (label == "b"))).save(folder / f"{i}.jpg")
    monkeypatch.setattr(decoding, "gpu_decoding", lambda device: device is not None)
    common = data_setup.DataDescription(data_dir=str(tmp_path / "data"), image_size=16, val_fraction=0.25, seed=0)
    in_memory = data_setup.load_splits(replace(common, cache_dir=tmp_path / "cache", decode_device=CPU))
    streamed = data_setup.load_splits(replace(common, memory_budget_mb=0, workers=2, decode_device=CPU))
    pillow = data_setup.load_splits(replace(common, cache_dir=tmp_path / "cache"))
    assert streamed.streamed and streamed.train.images is None and streamed.train.decode_device == CPU
    assert in_memory.mean == pytest.approx(streamed.mean)
    assert not torch.equal(in_memory.train.images, pillow.train.images)  # another decoder, another cache file
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 6
    for split in ("train", "val", "test"):
        loaders = [data_setup.BatchLoader(getattr(s, split), 3, s.mean, s.std, CPU, data_setup.Augmentation(2, True),
                                          seed=1, workers=2) for s in (in_memory, streamed)]
        for _ in range(2):
            reference, other = [list(loader) for loader in loaders]
            assert len(reference) == len(other) == len(loaders[0])
            for (xa, ya), (xb, yb) in zip(reference, other, strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
