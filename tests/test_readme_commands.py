"""The README's own workflow: every command of "Training on VOC 2012" and "Your own images and your own data", in
order and as written, on tiny generated data (only the sizes are shrunk), and every file those sections name."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, THREADS, make_voc_tree
from test_pair_lists import make_pair_list_dataset
import some_define as sd

SECTIONS = ("Training on VOC 2012", "Your own images and your own data")
# Appended to every training command: tiny, offline (no ImageNet download), on the CPU. A fine-tune trains one epoch.
TINY_TRAINING = ["--pretrained", "none", "--device", "cpu", "--crop", "32", "32", "--batch-size", "2",
                 "--workers", "0", "--epochs", "2"]
INTERRUPTED_EPOCHS = ["--epochs", "12"]   # a run that the README's --resume continues: stopped with Ctrl-C first
PHOTOS = ("street.jpg", "garden.jpg")


def section_text(name: str) -> str:
    """A '## ' section of the English part of README.md."""
    english = (REPO_ROOT / "README.md").read_text().split("\n## 简体中文")[0]
    match = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", english, re.M | re.S)
    assert match, f"README.md has no section '## {name}'"
    return match.group(1)


def readme_commands() -> list[list[str]]:
    """The commands of the README's ```bash blocks in SECTIONS, without their comments."""
    commands = []
    for name in SECTIONS:
        for block in re.findall(r"```bash\n(.*?)```", section_text(name), re.S):
            for line in block.splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    commands.append(words)
    return commands


def named_files() -> set[str]:
    """Every file under runs/ or pictures/ that the sections name (their commands' comments and text)."""
    text = "\n".join(section_text(name) for name in SECTIONS)
    return set(re.findall(r"\b((?:runs|pictures)/[\w./-]+\.(?:pt|png|json|csv))\b", text))


def make_workspace(root: Path) -> None:
    """What the commands read: ./VOC2012, mine/ (VOC layout, own class file), pairs/ (pair lists), photos/."""
    make_voc_tree(root, [(48, 48)] * 6, [(48, 64)] * 3)
    make_voc_tree(root / "mine", [(48, 48)] * 4, [(40, 56)] * 2, layout="flat")
    (root / "mine" / "classes.txt").write_text("\n".join(sd.VOC_CLASSES) + "\n")   # names only: well-separated colours
    for mask in make_pair_list_dataset(root / "pairs", {"train": 4, "val": 2}, hw=(48, 48)).glob("*annot/*.png"):
        labels = np.array(Image.open(mask))   # classes 0..2 and 255 (void), as the README's command expects
        Image.fromarray(np.where(labels < 3, labels, 255).astype(np.uint8)).save(mask)
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(root / "photos" / name)


def run(words: list[str], cwd: Path, interrupt_after_epoch_1: bool = False) -> subprocess.CompletedProcess:
    """A README command with this Python and the repository's script, in ``cwd``."""
    assert words[0] == "python" and words[1].endswith(".py"), words
    args = [sys.executable, str(REPO_ROOT / words[1]), *words[2:]]
    if words[1].endswith("train.py"):
        args += TINY_TRAINING + (INTERRUPTED_EPOCHS if interrupt_after_epoch_1 or "--resume" in words else [])
        if "--finetune-from" in words:
            args += ["--epochs", "1"]
    env = dict(os.environ, TQDM_DISABLE="1", MPLBACKEND="Agg", OMP_NUM_THREADS=THREADS)
    if not interrupt_after_epoch_1:
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = cwd / "runs" / "my" / "history.csv"
    deadline = time.time() + 300
    while not history.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)   # Ctrl-C: the run saves where it is, for --resume
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def test_every_command_of_the_readme_sections_runs_and_writes_what_they_name(tmp_path):
    make_workspace(tmp_path)
    commands = readme_commands()
    assert any("--resume" in c for c in commands) and any("--finetune-from" in c for c in commands)
    for i, words in enumerate(commands):
        interrupted = i + 1 < len(commands) and "--resume" in commands[i + 1]
        result = run(words, tmp_path, interrupted)
        expected = 130 if interrupted else 0
        assert result.returncode == expected, f"{shlex.join(words)}: exit {result.returncode}\n{result.stderr[-2000:]}"
    missing = sorted(f for f in named_files() if not (tmp_path / f).is_file())
    assert not missing, f"files the README names that its commands did not write: {missing}"
    for save_dir in {c[c.index("--save-dir") + 1] for c in commands if "--save-dir" in c}:
        for photo in PHOTOS:
            stem = Path(photo).stem
            assert (tmp_path / save_dir / f"{stem}.png").is_file() and (tmp_path / save_dir / f"{stem}_overlay.jpg").is_file()
    out_dirs = {c[c.index("--out") + 1] for c in commands if "--out" in c} | {"runs/origin", "runs/my"}
    for out in out_dirs:   # what every run writes, as the section says
        for name in ("history.csv", "curves.png", "last.pt", "best.pt"):
            assert (tmp_path / out / name).is_file(), f"{out}/{name}"


def test_the_commands_are_found_as_the_readme_writes_them():
    commands = [shlex.join(c) for c in readme_commands()]
    assert commands[0].startswith("python origin_train.py") and len(commands) >= 10
    assert "runs/my-ft/best.pt" in named_files() and "pictures/compare.png" in named_files()
    with pytest.raises(AssertionError, match="no section"):
        section_text("A section the README does not have")
