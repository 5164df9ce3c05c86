"""The GPU-path settings a CPU can check: torch.compile (the compiled training forward learns what the
eager one does, recompiles at an unfreeze, leaves checkpoints untouched, takes over a compile request
from the launch config), non-blocking host-to-device copies, and the CUDA flags of deterministic mode."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_trainer

from dist_finetune import ImageClassifier, trainer as trainer_module
from dist_finetune.cli import build_parser, train_config
from dist_finetune.config import ConfigError, TrainerConfig
from dist_finetune.distributed import launcher_compile_settings, make_accelerator
from dist_finetune.finetuning import FreezeUnfreeze


def finetune(data, **settings) -> tuple[ImageClassifier, list[dict]]:
    torch.manual_seed(0)
    task = ImageClassifier(data.num_classes, "tiny_resnet", pretrained=False)
    metrics = tiny_trainer(max_epochs=2, **settings).finetune(task, data, FreezeUnfreeze(unfreeze_epoch=1))
    return task, metrics


def test_compiled_training_matches_eager_and_recompiles_at_the_unfreeze(tiny_data, tmp_path):
    eager, _ = finetune(tiny_data)
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["aot_autograd"]["ok"]
    compiled, metrics = finetune(tiny_data, compile=True, compile_backend="aot_eager", output_dir=str(tmp_path))
    assert torch._dynamo.utils.counters["aot_autograd"]["ok"] - graphs_before >= 2, "frozen and unfrozen graphs"
    a, b = eager.state_dict(), compiled.state_dict()
    assert a.keys() == b.keys()  # compiling never renames the checkpoint's keys
    worst = max((a[n].double() - b[n].double()).abs().max().item() for n in a if a[n].is_floating_point())
    assert worst < 1e-4, f"compiled vs eager max difference {worst}"
    assert metrics[1]["train_images"] == 24 and all(m["train_loss"] > 0 for m in metrics)
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "model.safetensors")
    assert torch.equal(reloaded.state_dict()["head.layers.0.weight"], b["head.layers.0.weight"])


def test_a_launch_config_compile_request_is_taken_over(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "max-autotune")
    assert launcher_compile_settings() == ("aot_eager", "max-autotune")
    accelerator = make_accelerator()
    assert accelerator.state.dynamo_plugin.backend.value == "NO", "accelerate must not compile inside prepare"
    assert accelerator.non_blocking, "batches (pinned on GPU) are copied asynchronously"
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    assert launcher_compile_settings() is None


def test_compile_flags_and_validation():
    args = build_parser().parse_args(["train", "--compile", "--compile-backend", "aot_eager",
                                      "--compile-mode", "max-autotune", "--check-every-n-steps", "50"])
    trainer = train_config(args).trainer
    assert (trainer.compile, trainer.compile_backend, trainer.compile_mode) == (True, "aot_eager", "max-autotune")
    assert trainer.check_every_n_steps == 50
    with pytest.raises(ConfigError, match="compile_mode must be one of"):
        TrainerConfig(compile_mode="fastest")
    with pytest.raises(ConfigError, match="check_every_n_steps must be >= 1"):
        TrainerConfig(check_every_n_steps=0)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_mode_sets_the_cuda_flags_before_cuda_starts(deterministic, monkeypatch):
    """On a (faked) CUDA device: by default cuDNN benchmarks and torch's TF32 defaults stay; deterministic=True
    turns benchmark and TF32 off, cuDNN and every op deterministic, and sets cuBLAS's workspace before the
    accelerator starts CUDA."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    fresh_process = ((cudnn, "benchmark", False), (cudnn, "deterministic", False), (cudnn, "allow_tf32", True),
                     (matmul, "allow_tf32", False))
    for module, flag, value in fresh_process:  # the test's own flags; monkeypatch restores the process's
        monkeypatch.setattr(module, flag, value)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **_: calls.append(("algorithms", mode)))

    def cuda_accelerator(*args):
        calls.append(("accelerator starts", os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return SimpleNamespace(device=torch.device("cuda", 0))

    monkeypatch.setattr(trainer_module, "make_accelerator", cuda_accelerator)
    tiny_trainer(deterministic=deterministic)._make_accelerator()
    flags = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    if deterministic:
        assert flags == (False, True, False, False)
        assert calls == [("algorithms", True), ("accelerator starts", ":4096:8")]
    else:
        assert flags == (True, False, True, False)
        assert calls == [("accelerator starts", None)]
