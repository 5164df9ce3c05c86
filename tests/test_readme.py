"""The documentation's examples work as written: README.md and every page in docs/ (a page added
later is picked up by its name alone).

Every python block of a page runs, in order, in one namespace per page, on generated tiny images:
only paths (the `data/` folders the pages name are created) and sizes (image size, batch size,
epochs) change. Pretrained weights come from a pre-filled torch hub cache, as on a machine that has
downloaded them once, so no example needs the network. A block that needs the network or a GPU is
written as ```text (or ```bash), which is not run. Every bash block parses (`bash -n`), every
`dist-finetune` / `python -m dist_finetune` command in one uses only flags its subcommand has, every
`python -m benchmarks` command names a subcommand that exists, and every relative link resolves."""

from __future__ import annotations

import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(r"image_size=\d+", "image_size=32"), (r"batch_size=\d+", "batch_size=4"), (r"max_epochs=\d+", "max_epochs=4")]


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


def shrink(code: str) -> str:
    for pattern, replacement in SIZES:
        code = re.sub(pattern, replacement, code)
    return code


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.fixture()
def docs_world(tmp_path, monkeypatch):
    """A working directory with the data/ folders the examples name, and resnet18 'downloaded'."""
    text = "\n".join(page.read_text() for page in pages())
    classes = tuple(sorted(set(re.findall(r"data/val/(\w+)/", text)) | {"ants", "bees"}))
    write_image_folder(tmp_path / "data" / "train", classes=classes, per_class=8, seed=1)
    write_image_folder(tmp_path / "data" / "val", classes=classes, per_class=4, seed=2)
    for path in re.findall(r"(?<![\w/])data/val/\w+/[\w.]+\.jpg", text):
        # an unseen image drawn as its folder's class is (conftest: the class index picks the square's colour)
        write_image_folder(tmp_path / "tmp", classes=classes, per_class=1, seed=3)
        label = Path(path).parent.name
        (tmp_path / path).write_bytes((tmp_path / "tmp" / label / f"{label}_0.png").read_bytes())
    hub = tmp_path / "torch_home"
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    with torch.random.fork_rng():  # the same "pretrained" weights whatever ran before (the RNG's state)
        torch.manual_seed(0)
        pretrained = torchvision.models.resnet18().state_dict()
    torch.save(pretrained, hub / "hub" / "checkpoints" / Path(weights.url).name)
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_examples_users_copy_are_there():
    readme = "\n".join(blocks(ROOT / "README.md", "python"))
    for needed in ("from_folders", "finetune(", "load_from_checkpoint", "FreezeUnfreeze(unfreeze_epoch=11)"):
        assert needed in readme, needed
    everywhere = "\n".join(block for page in pages() for block in blocks(page, "python"))
    for needed in ("class FeatureExtractorFreezeUnfreeze", "callbacks=["):
        assert needed in everywhere, needed
    assert len(pages()) > 5, "the manual's pages are in docs/"


def run_page(page: Path) -> tuple[dict, list[list[str]]]:
    """Run the page's python blocks in order in one namespace; returns it and, per block, the warnings
    raised from dist_finetune."""
    package = str(ROOT / "dist_finetune")
    module = types.ModuleType("docs_page")  # a real module: a dataclass defined in a block looks itself up there
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    ours: list[list[str]] = []
    for index, block in enumerate(blocks(page, "python")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                exec(compile(shrink(block), f"{name(page)} python block {index}", "exec"), namespace)
            except Exception as error:  # noqa: BLE001 - name the block that broke
                raise AssertionError(f"{name(page)} python block {index} failed: {error!r}\n{block}") from error
        ours.append([str(w.message) for w in caught if w.filename.startswith(package)])
    return namespace, ours


def test_every_python_block_of_the_readme_runs(docs_world):
    """Each block runs; the results its comments state hold: the saved model is the best epoch's (also in
    runs/bees/), predict labels the bees image "bees", a list gives a list and a folder {path: label};
    the schedule that never fires says so in exactly one warning of ours."""
    from safetensors.torch import load_file

    readme = ROOT / "README.md"
    namespace, ours = run_page(readme)
    saved, kept = load_file("model.safetensors"), load_file("runs/bees/model.safetensors")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    clf = namespace["clf"]
    assert clf.predict("data/val/bees/x.jpg") == "bees"
    assert clf.predict(["data/val/bees/x.jpg"] * 2) == ["bees", "bees"]
    labels = clf.predict("data/val/")
    assert len(labels) == len([p for p in Path("data/val").rglob("*") if p.is_file()])
    assert set(labels.values()) <= {p.name for p in Path("data/val").iterdir()}
    code = blocks(readme, "python")
    first = next(i for i, block in enumerate(code) if "clf.predict(" in block)
    never = next(i for i, block in enumerate(code) if "FreezeUnfreeze(unfreeze_epoch=11)" in block)
    assert ours[first] == [], ours[first]
    assert len(ours[never]) == 1 and "never happens" in ours[never][0], ours[never]


@pytest.mark.parametrize("page", [p for p in pages()[1:] if blocks(p, "python")], ids=name)
def test_every_python_block_of_a_docs_page_runs(page, docs_world):
    run_page(page)

def commands(page: Path) -> list[str]:
    """The command lines of the page's bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def test_every_bash_block_parses():
    for page in pages():
        for index, block in enumerate(blocks(page, "bash")):
            result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
            assert result.returncode == 0, f"{name(page)} bash block {index}: {result.stderr}\n{block}"


def test_documented_commands_use_flags_and_subcommands_that_exist():
    from benchmarks.__main__ import SUBCOMMANDS
    from dist_finetune.cli import build_parser

    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.choices and "train" in action.choices).choices
    checked = 0
    for page in pages():
        for line in commands(page):
            ours = re.search(r"(?:dist-finetune|-m dist_finetune) ([\w-]+)(.*)", line)
            if ours and ours.group(1) in subparsers:
                known = set(subparsers[ours.group(1)]._option_string_actions)
                unknown = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", ours.group(2))) - known
                assert not unknown, f"{name(page)}: {line}\n  {ours.group(1)} has no {sorted(unknown)}"
                checked += 1
            elif ours:
                raise AssertionError(f"{name(page)}: {line}\n  no subcommand {ours.group(1)!r}")
            tool = re.search(r"python -m benchmarks (\S+)", line)
            if tool:
                assert tool.group(1) in SUBCOMMANDS or tool.group(1) == "--help", f"{name(page)}: {line}"
    assert checked > 20


def test_relative_links_resolve():
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://|#|mailto:", target):
                continue
            assert (page.parent / target.split("#", 1)[0]).exists(), f"{name(page)} links to a missing {target}"
