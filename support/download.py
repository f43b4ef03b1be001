"""Where a run's data is: find_data, the one function that finds a dataset folder (the demo data, a folder in any
layout, or PASCAL VOC 2012 fetched with --download: resumable, MD5-checked, extracted atomically)."""
from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import tempfile
from pathlib import Path

from some_define import UsageError

from .data import VOC_TAR, VOC_URL, is_voc_dir, recognise_layout
from .demo import make_demo_voc
from .distributed import env_world_size
from .files import new_folder_removed_on_failure

VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"


def download_file(url: str, path: Path) -> None:
    """Fetch ``url`` into ``path`` through ``path.part`` with a progress bar. A .part left by an interrupted run is
    continued with an HTTP Range request; a server that ignores the range (or a file:// URL) sends everything
    again, and the .part then starts afresh. The .part becomes ``path`` only once complete."""
    import http.client
    import urllib.error
    import urllib.request
    from tqdm import tqdm
    part = path.with_name(path.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    total = None
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if response.status != 206:
                start = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length else None
            with open(part, "ab" if start else "wb") as f, \
                    tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
                         dynamic_ncols=True, disable=not sys.stderr.isatty()) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and start):   # 416: nothing left after the .part, which is therefore complete
            raise UsageError(f"downloading {url} failed (HTTP {e.code} {e.reason}); try another --mirror URL")
    except (OSError, http.client.HTTPException) as e:
        kept = part.stat().st_size if part.is_file() else 0
        again = f"run again to resume from the {kept} bytes in {part}" if kept else "run again to retry"
        raise UsageError(f"downloading {url} failed ({getattr(e, 'reason', e)}); {again}, or try another --mirror "
                         f"URL")
    if total is not None and part.stat().st_size < total:
        raise UsageError(f"downloading {url} stopped at {part.stat().st_size} of {total} bytes; run again to resume "
                         f"from {part}")
    os.replace(part, path)


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def extract_voc_tar(tar_path: Path, root: Path) -> Path:
    """Extract into a temporary folder inside ``root``, then move its VOCdevkit/VOC2012 into ``root/VOCdevkit``
    in one rename: a failure leaves no half-extracted tree that could pass for the dataset."""
    # Python's "data" filter refuses absolute paths, "..", links out of the tree and device files.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tempfile.TemporaryDirectory(dir=root, prefix=".extracting-", ignore_cleanup_errors=True) as tmp:
        try:
            with tarfile.open(tar_path) as tar:
                tar.extractall(tmp, **safe)
        except (tarfile.TarError, OSError) as e:
            raise UsageError(f"{tar_path}: cannot extract it ({e}); nothing was extracted")
        extracted, target = Path(tmp) / "VOCdevkit" / "VOC2012", root / "VOCdevkit" / "VOC2012"
        if not is_voc_dir(extracted):
            raise UsageError(f"{tar_path}: it holds no VOCdevkit/VOC2012 with JPEGImages/, SegmentationClass/ and "
                             f"ImageSets/Segmentation/; nothing was extracted")
        target.parent.mkdir(exist_ok=True)
        try:
            os.replace(extracted, target)
        except OSError as e:
            raise UsageError(f"{target} exists but is not a complete VOC2012 ({e.strerror}); move it away and run "
                             f"again")
        return target


def download_voc(root: str | os.PathLike, url: str = VOC_URL, md5: str | None = None) -> Path:
    """Fetch VOC_TAR into ``root`` (resuming a partial download), check its MD5 (``md5``, default VOC_MD5) and
    extract it; return root/VOCdevkit/VOC2012. The tar is kept (2 GB; delete it once extracted if space is short)."""
    root, tar_path = Path(root), Path(root) / VOC_TAR
    with new_folder_removed_on_failure(root):   # kept once it holds a .part to resume from
        root.mkdir(parents=True, exist_ok=True)
        if not tar_path.is_file():
            print(f"downloading {url} into {root}")
            download_file(url, tar_path)
        expected = md5 or VOC_MD5
        print(f"checking the MD5 of {tar_path} ...")
        actual = file_md5(tar_path)
        if actual != expected:
            tar_path.unlink()   # a wrong complete file cannot be resumed: the next run must fetch it afresh
            raise UsageError(f"{tar_path}: MD5 {actual} is not the expected {expected}; removed it, run again to "
                             f"download it afresh (or try another --mirror URL)")
    print(f"extracting {tar_path} ...")
    return extract_voc_tar(tar_path, root)


def find_data(data_dir: str | None, demo: bool = False, download: bool = False, mirror: str | None = None) -> Path:
    """The dataset folder: the demo data (generated on first use), the folder at ``data_dir`` (default ./VOC2012)
    in either layout, or with ``download`` VOC fetched first into its parent folder if it is not there yet."""
    if demo:
        return make_demo_voc()
    path = Path(data_dir or "VOC2012")
    try:
        return recognise_layout(path)
    except UsageError:
        fetched = path.parent / "VOCdevkit" / "VOC2012"
        if not download:
            raise
        if is_voc_dir(fetched):
            return fetched
    if env_world_size() > 1:   # every process would write the same file
        raise UsageError("--download under torchrun: fetch the data first with one process (python ... --download)")
    return download_voc(path.parent, mirror or VOC_URL)
