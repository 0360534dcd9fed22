"""The README's quick start, run as written on a small image folder (10 classes, like the
CIFAR-10 stand-in weights it makes), with only the folder's name filled in."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def commands(title: str) -> list[list[str]]:
    """The shell commands of the README section ``title``: continuation lines joined,
    comments dropped, each split as the shell splits it."""
    start = README.index(f"\n## {title}\n")
    block = re.search(r"```bash\n(.*?)```", README[start:], re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    """DIR/train/<class>/ with 8 and DIR/test/<class>/ with 2 images of each of 10 classes:
    a colour per class, and two looks per colour (stripes across or down), so that the
    quick start's two k-means clusters per class each find their 4 training images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("quick") / "DIR"
    gen = torch.Generator().manual_seed(0)
    stripes = (torch.arange(32) // 4 % 2).float()
    for split, n in (("train", 8), ("test", 2)):
        for c in range(10):
            colour = torch.tensor([(c * 37 % 10) / 10, (c * 53 % 10) / 10, (c * 71 % 10) / 10])
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pattern = stripes[:, None] if i % 2 else stripes[None, :]  # across / down
                img = colour[:, None, None] * (0.4 + 0.6 * pattern.expand(32, 32))
                img = img + 0.05 * torch.rand(3, 32, 32, generator=gen)
                arr = (img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
                Image.fromarray(arr).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_quick_start_runs_as_written(ten_classes, tmp_path):
    pytest.importorskip("pyautoattack", reason="the quick start converts its weights")
    steps = commands("Quick start")
    assert [s[:2] for s in steps] == [["python", "-m"], ["python", "main_clustr.py"],
                                      ["python", "main_clustr.py"]]
    weights = tmp_path / "resnet18.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for argv in steps:
        argv = [str(ten_classes) if a == "DIR" else a for a in argv]
        argv = [str(weights) if a == "pretrained_weights/resnet18.pt" else a for a in argv]
        argv = [sys.executable, *[str(ROOT / a) if a == "main_clustr.py" else a
                                  for a in argv[1:]]]
        if "pretrained_weights.from_autoattack" in argv:
            argv += ["--out", str(weights)]  # the repository's own folder stays untouched
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, (argv, res.stderr[-2000:])
    assert (tmp_path / "expA" / "checkpoint.pth").is_file()
    strong = (tmp_path / "expA_strong" / "attack_results_strong.csv").read_text()
    assert "paper-pgd" in strong and "pgd-dlr" in strong and "worst-case" in strong
