"""strategy="lora" (dist_finetune/lora.py): what trains, the merged model file (loaded without peft), the adapter
file, bad settings refused before anything is written, and a bit-exact resume. Two ranks:
integration/test_distributed_ranks.py ("lora" in the strategies launch)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap

import pytest
import tiny_vit  # noqa: F401  (registers the "tiny_vit" backbone)
import torch
from conftest import Killed, kill_at, tiny_trainer
from safetensors.torch import load_file, save_file

from dist_finetune import ImageClassifier, seed_everything
from dist_finetune.callbacks import Callback
from dist_finetune.checkpoint import read_metadata
from dist_finetune.errors import CheckpointError, ConfigError

# tiny_vit's one block: qkv 16->48, proj 16->16, fc1 16->32, fc2 32->16; an adapter of rank r on a Linear
# in->out holds r*in (A) + out*r (B) parameters; the head is Linear 16->3 (48 + 3)
RANK = 2
VIT_ADAPTER_PARAMETERS = RANK * ((16 + 48) + (16 + 16) + (16 + 32) + (32 + 16))  # 384
VIT_HEAD_PARAMETERS = 16 * 3 + 3
VIT_TARGETS = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


class UnmergedLogits(Callback):
    """Each epoch's logits of the model as it trains (adapters unmerged), on fixed images, in eval mode."""

    def __init__(self, images: torch.Tensor):
        self.images, self.logits = images, {}

    def on_validation_end(self, trainer, run, record) -> None:
        was_training = run.task.training
        with torch.no_grad():
            self.logits[record["epoch"]] = run.task.eval()(self.images)
        run.task.train(was_training)


def lora(**settings):
    from dist_finetune.lora import LoRA

    return LoRA(**{"rank": RANK, "alpha": 4.0, "unfreeze_epoch": 1, **settings})


@pytest.fixture(scope="module")
def vit_run(tiny_data, tmp_path_factory):
    """tiny_vit, adapters joining at epoch 1 of 2 (lora()), its log kept; the backbone's initial weights saved as a
    backbone file."""
    out = tmp_path_factory.mktemp("lora_vit")
    seed_everything(0)
    task = ImageClassifier(tiny_data.num_classes, "tiny_vit", pretrained=False)
    initial = {n: t.clone() for n, t in task.state_dict().items()}
    save_file(dict(task.backbone.state_dict()), out / "initial_backbone.safetensors")
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    probe = UnmergedLogits(images)
    trainer = tiny_trainer(max_epochs=2, output_dir=str(out / "run"), callbacks=[probe])
    with contextlib.redirect_stdout(io.StringIO()) as log:
        trainer.finetune(task, tiny_data, lora())
    return {"out": out, "task": task, "initial": initial, "images": images, "logits": probe.logits,
            "log": log.getvalue()}


def test_only_the_adapters_and_the_head_train_and_the_log_says_how_many(vit_run):
    """Head only in epoch 0, adapters join at 1: the log counts from first principles; afterwards the task is a
    plain model (merged) whose adapted weights moved, everything else of the backbone as initialised."""
    plain = sum(p.numel() for p in ImageClassifier(3, "tiny_vit", pretrained=False).parameters())
    total = plain + VIT_ADAPTER_PARAMETERS
    joined = VIT_HEAD_PARAMETERS + VIT_ADAPTER_PARAMETERS
    task, initial = vit_run["task"], vit_run["initial"]
    assert total == 15091 and joined == 435
    log = vit_run["log"]
    assert f"trainable parameters: {VIT_HEAD_PARAMETERS} of {total:,} (0.34%)" in log
    assert f"trainable parameters: {joined} of {total:,} (2.88%)" in log
    state = task.state_dict()
    assert state.keys() == initial.keys(), "merged: the plain model's names, no base_layer or lora_ tensors"
    moved = {name for name in state if not torch.equal(state[name], initial[name])}
    assert moved == {f"backbone.{t}.weight" for t in VIT_TARGETS} | {"head.layers.0.weight", "head.layers.0.bias"}


def test_the_model_file_is_merged_and_predicts_without_peft(vit_run, tiny_data):
    """model.safetensors: plain names; a process where peft cannot be imported loads it (and predicts a file)
    and its logits equal those of the unmerged model at the saved epoch."""
    model_file = vit_run["out"] / "run" / "model.safetensors"
    assert load_file(model_file).keys() == vit_run["initial"].keys()
    epoch = read_metadata(model_file)["training"]["epoch"]
    torch.save(vit_run["images"], vit_run["out"] / "images.pt")
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["peft"] = None  # import peft now fails, as where it is not installed
        import torch, tiny_vit
        from dist_finetune import ImageClassifier
        model = ImageClassifier.load_from_checkpoint({str(model_file)!r})
        with torch.no_grad():
            logits = model(torch.load({str(vit_run["out"] / "images.pt")!r}))
        print(json.dumps({{"logits": logits.tolist(), "label": model.predict({tiny_data.val_paths[0]!r})}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["label"] in tiny_data.classes
    difference = (torch.tensor(loaded["logits"]) - vit_run["logits"][epoch]).abs().max().item()
    assert difference < 1e-5, difference


def test_the_adapter_file_is_small_and_rebuilds_the_model(vit_run):
    """model.adapter.safetensors: the 8 adapter tensors and the head, nothing else; with the backbone's initial
    weights it rebuilds the saved model (its logits within float tolerance)."""
    run = vit_run["out"] / "run"
    adapter = load_file(run / "model.adapter.safetensors")
    assert set(adapter) == {f"backbone.{t}.lora_{ab}.default.weight" for t in VIT_TARGETS for ab in "AB"} | \
        {"head.layers.0.weight", "head.layers.0.bias"}
    assert sum(t.numel() for t in adapter.values()) == VIT_ADAPTER_PARAMETERS + VIT_HEAD_PARAMETERS
    assert (run / "model.adapter.safetensors").stat().st_size < (run / "model.safetensors").stat().st_size / 5
    rebuilt = ImageClassifier.load_adapter(run / "model.adapter.safetensors",
                                           weights=str(vit_run["out"] / "initial_backbone.safetensors"))
    epoch = read_metadata(run / "model.safetensors")["training"]["epoch"]
    with torch.no_grad():
        difference = (rebuilt(vit_run["images"]) - vit_run["logits"][epoch]).abs().max().item()
    assert difference < 1e-5, difference
    with pytest.raises(CheckpointError, match="not a LoRA adapter file"):
        ImageClassifier.load_adapter(run / "model.safetensors")


def test_default_targets_per_backbone_family_and_patterns():
    """ViT: its Linears; conv net: its convolutions, depthwise ones skipped (peft cannot merge them); patterns
    match a name, its last parts, or a glob."""
    from dist_finetune.lora import lora_targets

    vit = ImageClassifier(3, "tiny_vit", pretrained=False)
    assert lora_targets(vit) == VIT_TARGETS
    assert lora_targets(vit, ["qkv"]) == ["blocks.0.attn.qkv"]
    assert lora_targets(vit, ["blocks.*.mlp.*"]) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    mobilenet = ImageClassifier(3, "mobilenet_v3_small", pretrained=False)
    targets = lora_targets(mobilenet)
    depthwise = mobilenet.backbone.get_submodule("features.1.block.0.0")
    assert depthwise.groups == 16 and "features.1.block.0.0" not in targets
    assert "features.0.0" in targets and "features.1.block.2.0" in targets  # stem and a pointwise conv


def test_a_timm_layer_takes_its_adapted_modules_whole():
    """timm lists a layer by parameter names; an adapted module joins its layer whole, so every adapter (and
    every other backbone parameter) is in a backbone layer: layer decay and the "joined" names see them."""
    from dist_finetune.finetuning import layer_index

    task = ImageClassifier(3, "timm:test_efficientnet", pretrained=False)
    lora().freeze_before_training(task)
    index, _ = layer_index(task)
    adapters = [p for name, p in task.named_parameters() if ".lora_" in name]
    assert len(adapters) > 10 and all(id(p) in index for p in adapters)
    assert all(id(p) in index for p in task.backbone.parameters())


@pytest.mark.parametrize("settings, message", [
    ({"rank": 0}, r"lora_rank \(--lora-rank\) must be a positive integer, got 0"),
    ({"rank": -2}, r"lora_rank .* got -2"),
    ({"alpha": 0}, r"lora_alpha \(--lora-alpha\) must be > 0"),
    ({"dropout": 1.0}, r"lora_dropout .* \[0, 1\)"),
    ({"targets": []}, r"lora_targets .* non-empty list"),
    ({"train_bn": True}, r"keeps BatchNorm as pretrained"),
])
def test_bad_settings_are_refused_when_the_strategy_is_built(settings, message):
    with pytest.raises(ConfigError, match=message):
        lora(**settings)


def test_bad_input_fails_before_anything_is_written(image_folders, tiny_data, tmp_path, capsys, monkeypatch):
    """From the command line (rank 0; targets matching nothing) and from Python (no matching module, FSDP2, a
    task still holding adapters, no peft): one clear error, no output dir, no accelerator."""
    from test_run_records import train_args

    from dist_finetune.cli import main

    for extra, message in ((["--lora-rank", "0"], "lora_rank (--lora-rank) must be a positive integer"),
                           (["--lora-targets", "qkv", "proj"], "no Linear or Conv2d module (grouped convolutions "
                                                               "excluded) of backbone tiny_resnet matches lora_targets "
                                                               "['qkv', 'proj'] (--lora-targets)")):
        out = tmp_path / "cli"
        with pytest.raises(SystemExit) as exited:
            main([*train_args(image_folders, out, "--strategy", "lora", *extra)])
        assert exited.value.code == 2 and message in capsys.readouterr().err
        assert not out.exists()
    for strategy, settings, message in ((lora(targets=["qkv"]), {}, "no Linear or Conv2d .* tiny_resnet"),
                                        (lora(), {"sharding": "fsdp2"}, "use sharding 'ddp'")):
        trainer = tiny_trainer(output_dir=str(tmp_path / "python"), **settings)
        with pytest.raises(ConfigError, match=message):
            trainer.finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), tiny_data, strategy)
        assert trainer.accelerator is None and not (tmp_path / "python").exists()
    adapted = ImageClassifier(3, "tiny_resnet", pretrained=False)
    lora().freeze_before_training(adapted)
    with pytest.raises(ConfigError, match="already holds LoRA adapters"):
        tiny_trainer().finetune(adapted, tiny_data, lora())
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError, match=r"needs the peft package: pip install 'dist_finetune\[lora\]'"):
        lora()


def test_a_killed_conv_run_resumes_bit_exactly(tiny_data, tmp_path):
    """tiny_resnet, adapters on its 20 convolutions from the start of its one epoch (6 steps), killed at step 5 and
    resumed from step 4's checkpoint (adapter weights and their AdamW moments): the same model file and adapter
    as the uninterrupted run, bit for bit."""
    def finetune(out, callbacks=(), resume=None):
        seed_everything(0)
        task = ImageClassifier(3, "tiny_resnet", pretrained=False)
        trainer = tiny_trainer(max_epochs=1, output_dir=str(out), save_every_n_steps=2, callbacks=list(callbacks))
        trainer.finetune(task, tiny_data, lora(unfreeze_epoch=0), resume=resume)
        return load_file(out / "model.safetensors"), load_file(out / "model.adapter.safetensors")

    uninterrupted, adapter = finetune(tmp_path / "a")
    assert len([k for k in adapter if ".lora_A." in k]) == 20
    assert adapter["backbone.conv1.lora_A.default.weight"].shape == (RANK, 3, 3, 3)  # conv 3->8, 3x3: A is 3->r
    assert adapter["backbone.conv1.lora_B.default.weight"].shape == (8, RANK, 1, 1)  # B is r->8, 1x1
    with pytest.raises(Killed):
        finetune(tmp_path / "b", [kill_at(5)])
    resumed, resumed_adapter = finetune(tmp_path / "b", resume="latest")
    for saved, again in ((uninterrupted, resumed), (adapter, resumed_adapter)):
        assert saved.keys() == again.keys()
        assert not [name for name in saved if not torch.equal(saved[name], again[name])]
    assert not torch.equal(adapter["backbone.conv1.lora_B.default.weight"], torch.zeros(8, RANK, 1, 1)), "trained"
