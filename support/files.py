"""Writing output files atomically: a crash or Ctrl-C never leaves a half-written file behind, nor a failed command
an empty folder it made."""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from some_define import UsageError, plt_module


@contextmanager
def new_folder_removed_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """Around a block that creates the folder ``path``: if the block raises (Ctrl-C too) and the folder is empty,
    remove it and the empty parents the block created, then re-raise; a failed command leaves no folder behind. A
    folder that existed before, or that holds a file, is kept."""
    path = Path(path).absolute()
    new = [folder for folder in (path, *path.parents) if not folder.exists()]   # deepest first
    try:
        yield
    except BaseException:
        for folder in new:
            try:
                folder.rmdir()   # only ever an empty folder
            except FileNotFoundError:
                continue         # the block failed before making it
            except OSError:
                break            # not empty: then neither are its parents
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; a failure leaves neither the file nor a folder made for
    it."""
    path = Path(path)
    with new_folder_removed_on_failure(path.parent):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise UsageError(f"{path}: cannot write there ({e.strerror}); choose another output path")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~current_umask())   # mkstemp makes the file private; give it the usual mode
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """Create the folder now, so that an unwritable output stops the run before any work."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create the folder ({e.strerror})")
    if not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder is not writable")


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes the same file as ``source`` (a hard link where the file system has them)."""
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def write_json(data: dict, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read it as JSON ({e}); delete it to redo that step")


def write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure (the format comes from the real file name) and close it."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight"))
    plt_module().close(fig)


def write_history(history: list[dict], path: str | os.PathLike) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    atomic_write(path, write)
