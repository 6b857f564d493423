"""Device and precision choices (core.compute): the autocast dtype, when to compile and its fallback, cuDNN
autotuning, and a teacher stored for autocast."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from conftest import CPU, CUDA

import data_setup
import engine
import KD_engine
import model_builder
from core import compute


def test_resolve_amp_dtype(monkeypatch):
    cpu = torch.device("cpu")
    assert compute.resolve_amp_dtype("fp32", cpu) is None
    assert compute.resolve_amp_dtype("bf16", cpu) is torch.bfloat16
    # auto: bf16 exactly on processors that compute it natively (AVX512-BF16 or AMX), read here from the flags.
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8").split() if Path("/proc/cpuinfo").is_file() else []
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert compute.resolve_amp_dtype("auto", cpu) in (None, torch.bfloat16)
    assert compute.resolve_amp_dtype("auto", cpu) is (torch.bfloat16 if native else None)
    for has_bf16, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert compute.resolve_amp_dtype("auto", cpu) is expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            compute.resolve_device("cuda")


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


def test_cudnn_autotuning_only_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    compute.enable_autotuning(CPU)
    assert torch.backends.cudnn.benchmark is False
    compute.enable_autotuning(CUDA)
    assert torch.backends.cudnn.benchmark is True


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
