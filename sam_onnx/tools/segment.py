"""``sam-onnx segment``'s per-image work: the automatic mask generator over many images,
writing per image a COCO-style JSON of masks and an overlay PNG (``tools.dataset`` runs it
over a dataset, with its manifest, its annotations.json and resuming).

One generator (and so one pair of ONNX Runtime sessions) serves every image a process
handles; with ``workers`` > 1 the images are shared among processes, each with its share
of the CPU threads.
"""
from __future__ import annotations

import fnmatch
import glob
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union
from urllib.parse import quote, unquote

from ..core.errors import SamOnnxError
from ..core.files import atomic_write
from ..runtime import amg
from ..runtime.images import load_image
from ..runtime.render import save_masks_overlay

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


@dataclass(frozen=True)
class SegmentJob:
    encoder: Path
    decoder: Path
    out_dir: Path
    generator: Dict  # SamOnnxAutomaticMaskGenerator keyword arguments
    providers: Sequence[str] = ("cuda", "cpu")
    threads: int = 0


#: A file listing images, one path or URI a line (paths relative to the list's folder).
LIST_SUFFIXES = (".txt", ".lst")


@dataclass(frozen=True, order=True)
class RemoteImage:
    """An image at a filesystem URI (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``,
    ``file://``), read through pyarrow.fs, the filesystems Ray Data reads, on whichever
    machine segments it: Path's ``name``, ``stem`` and ``suffix``, and ``open()``."""

    uri: str

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return PurePosixPath(unquote(self.uri.partition("?")[0].split("://", 1)[1])).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def open(self) -> BinaryIO:
        filesystem, path = _filesystem(self.uri)
        return filesystem.open_input_file(path)


ImageSource = Union[Path, RemoteImage]


def image_source(text: str) -> ImageSource:
    """An image's path or URI, as find_images gives it and str() writes it."""
    return RemoteImage(text) if "://" in text else Path(text)


def open_image(image: ImageSource) -> BinaryIO:
    return image.open() if isinstance(image, RemoteImage) else open(image, "rb")


def _filesystem(uri: str):
    """(pyarrow filesystem, path in it) for a URI, or one line saying why not."""
    try:
        from pyarrow import fs
    except ImportError:
        raise SamOnnxError(f"{uri}: reading URIs needs pyarrow: pip install 'sam-onnx[ray]' "
                           "(or copy the images to a local folder)") from None
    try:
        return fs.FileSystem.from_uri(uri)
    except (ValueError, OSError, NotImplementedError) as exc:  # Arrow's errors subclass these
        raise SamOnnxError(f"{uri}: cannot open its filesystem ({_one_line(exc)}); give a URI "
                           "pyarrow.fs reads (s3://, gs://, hdfs://, abfs://, file://) with "
                           "its credentials set") from None


def _remote_images(uri: str) -> List[RemoteImage]:
    """A URI's images: the file, the images directly inside a folder, or those a pattern in
    its last part matches (``s3://bucket/tiles/*.tif``; ``?`` starts a URI's options, such
    as ``?region=``, so patterns use ``*`` and ``[...]``)."""
    address, mark, options = uri.partition("?")
    scheme, rest = address.split("://", 1)
    parent, _, last = rest.rstrip("/").rpartition("/")
    pattern = any(c in last for c in "*[")
    folder = f"{scheme}://{parent}" if pattern else address.rstrip("/")
    filesystem, path = _filesystem(folder + mark + options)  # says if pyarrow is missing
    from pyarrow import fs
    try:
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.File and not pattern:
            return [RemoteImage(uri)]
        if info.type != fs.FileType.Directory:
            raise SamOnnxError(f"{uri} does not exist; give image files or folders of images")
        listed = filesystem.get_file_info(fs.FileSelector(path))
    except OSError as exc:
        raise SamOnnxError(f"{uri}: cannot list it ({_one_line(exc)}); check the URI and "
                           "its credentials") from None
    found = sorted(RemoteImage(f"{folder}/{quote(item.base_name)}{mark}{options}")
                   for item in listed
                   if item.type == fs.FileType.File
                   and PurePosixPath(item.base_name).suffix.lower() in IMAGE_SUFFIXES
                   and (not pattern or fnmatch.fnmatchcase(item.base_name, last)))
    if not found:
        raise SamOnnxError(f"{uri} {'matches' if pattern else 'holds'} no images "
                           f"({', '.join(IMAGE_SUFFIXES)})")
    return found


def find_images(inputs: Iterable) -> List[ImageSource]:
    """Files as given, folders expanded to the images directly inside them, glob patterns
    (``images/*.jpg``, ``data/**/*.png``) to the files they match, and list files (``.txt``,
    ``.lst``) to the paths they list; URIs the same way (a pattern in their last part only;
    ``RemoteImage``); sorted within each input."""
    images: List[ImageSource] = []
    for text in map(str, inputs):
        if "://" in text:
            images += _remote_images(text)
            continue
        path = Path(text)
        if not path.exists() and any(c in text for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True)
                           if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SamOnnxError(f"{text} matches no images ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            listed = [line.strip() for line in path.read_text().splitlines()
                      if line.strip() and not line.startswith("#")]
            images += [RemoteImage(line) if "://" in line else path.parent / line
                       for line in listed]
            missing = [p for p in images if isinstance(p, Path) and not p.exists()]
            if missing:
                raise SamOnnxError(f"{missing[0]}, listed in {path}, does not exist; list "
                                   "image paths relative to the list's folder")
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SamOnnxError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        elif path.exists():
            images.append(path)
        else:
            raise SamOnnxError(f"{path} does not exist; give image files or folders of images")
    stems: Dict[str, ImageSource] = {}
    for path in images:
        if path.stem in stems:
            raise SamOnnxError(f"{stems[path.stem]} and {path} would both write "
                               f"{path.stem}.json; segment them into different --out folders")
        stems[path.stem] = path
    return images


def outputs(image: ImageSource, out_dir: Path) -> List[Path]:
    """What segmenting ``image`` writes: its COCO-style JSON and its overlay."""
    return [Path(out_dir) / f"{image.stem}.json", Path(out_dir) / f"{image.stem}.png"]


def check_outputs(images: Sequence[ImageSource], out_dir: Path) -> None:
    """Refuse, before any work, an output folder that is a file or where an image's outputs
    would replace an input image (an input is never overwritten; a ``file://`` one either)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SamOnnxError(f"--out {out} is a file; pass a folder")
    for image in images:
        local = Path(_filesystem(image.uri)[1]) if str(image).startswith("file://") \
            else image  # a file:// URI's path, decoded (%20...) as pyarrow reads it
        for target in outputs(image, out):
            if isinstance(local, Path) and target.exists() and local.exists() and \
                    os.path.samefile(target, local):
                raise SamOnnxError(f"{image} is an input, and {image.stem}'s overlay would be "
                                   "written over it; pass an --out folder other than the "
                                   "images' own (an input is never overwritten)")


def coco_record(image: ImageSource, size, records: List[Dict]) -> Dict:
    """A COCO-style document: the image, then one annotation per mask (compressed RLE)."""
    h, w = size
    return {
        "image": {"file_name": image.name, "height": h, "width": w},
        "annotations": [{"id": i, **r} for i, r in enumerate(records)],
    }


def _write_json(doc: Dict, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc) + "\n"),
                 "pick a writable --out folder")


class Segmenter:
    """One process's generator; segment() writes one image's JSON and overlay."""

    def __init__(self, job: SegmentJob) -> None:
        from ..runtime.automatic import SamOnnxAutomaticMaskGenerator
        from ..runtime.predictor import SamOnnxPredictor
        from ..runtime.sessions import SessionConfig

        config = SessionConfig(providers=tuple(job.providers), intra_op_threads=job.threads)
        self.job = job
        self.generator = SamOnnxAutomaticMaskGenerator(
            SamOnnxPredictor(job.encoder, job.decoder, config),
            output_mode="coco_rle", **job.generator)

    def segment(self, image: ImageSource,
                progress: Optional[Callable[[int, int], None]] = None) -> Dict:
        """Segment one image: {image_path, status: done, masks, seconds}, or, for an image
        that cannot be read or segmented (unreadable, truncated, oversized), {image_path,
        status: failed, reason (one line)}: the caller records it and goes on."""
        start = time.perf_counter()
        try:
            if isinstance(image, RemoteImage):
                with image.open() as stream:
                    data = io.BytesIO(stream.read())
                data.name = image.uri  # what an error names
                rgb = load_image(data)
            else:
                rgb = load_image(image)
            records = self.generator.generate(rgb, progress=progress)
            json_path, overlay = outputs(image, self.job.out_dir)
            _write_json(coco_record(image, rgb.shape[:2], records), json_path)
            masks = (amg.rle_to_mask(amg.coco_decode_rle(r["segmentation"])) for r in records)
            save_masks_overlay(rgb, masks, overlay)
        except (SamOnnxError, OSError) as exc:
            return {"image_path": image, "status": "failed", "reason": _one_line(exc),
                    "seconds": time.perf_counter() - start}
        return {"image_path": image, "status": "done", "masks": len(records),
                "seconds": time.perf_counter() - start}


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_WORKER: Optional[Segmenter] = None


def _init_worker(job: SegmentJob) -> None:
    global _WORKER
    _WORKER = Segmenter(job)


def _segment_in_worker(image: ImageSource) -> Dict:
    return _WORKER.segment(image)


def run_images(images: Sequence[ImageSource], job: SegmentJob, workers: int = 1,
               on_batch: Optional[Callable[[int, int], None]] = None) -> Iterator[Dict]:
    """Segment each image, yielding each one's result (``Segmenter.segment``) as it
    finishes: in this process, or shared among ``workers`` processes, each with its share
    of the CPU threads. ``on_batch`` after each batch of prompts (in this process only)."""
    if not images:
        return
    if workers <= 1:
        segmenter = Segmenter(job)
        for image in images:
            yield segmenter.segment(image, on_batch)
        return
    import multiprocessing

    threads = job.threads or max(1, (os.cpu_count() or 1) // workers)
    job = SegmentJob(**{**job.__dict__, "threads": threads})
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (job,)) as pool:
        yield from pool.imap(_segment_in_worker, images)
