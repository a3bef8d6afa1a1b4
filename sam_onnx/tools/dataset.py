"""``sam_onnx.segment_dataset``: segment everything in a dataset of images, resumably, with
nothing lost.

Per image, the COCO-style JSON and overlay ``tools.segment`` writes (each written whole or
not at all). In the output folder, two files of the whole dataset:

- ``manifest.jsonl``: a line per image each run finished with it: ``done``, ``failed``
  (with the one-line reason: an unreadable, truncated or oversized image does not stop the
  run) or ``skipped`` (done before, for the same input and graphs); the input's sha256, the
  model and a hash of the graphs, the seconds it took, when. Lines are appended and flushed
  to disk one by one: a killed run loses at most the images in flight (a half line it left
  is ignored).
- ``annotations.json``: every done image's masks as one COCO dataset (images, annotations,
  categories), rewritten whole at the end of each run. Image ids are given the first time an
  image is recorded and kept in the manifest; an annotation's id is its image's id x 100,000
  plus its index: the same ids on every re-run.

Running the same command again resumes: images done for the same input bytes and the same
graphs, whose outputs are there, are skipped; failed, changed and missing ones are redone.

Engines: ``local`` (this process, or ``workers`` processes sharing the images) and ``ray``
(Ray Data: the images a dataset, ``map_batches`` on a pool of ``workers`` actors, each
loading the sessions once; a local Ray is started when no ``address`` is given, else the
cluster at ``address`` is joined). Either way this process writes the manifest and
annotations.json; the workers write each image's files.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ..core.errors import SamOnnxError
from ..core.files import atomic_write
from .segment import (
    ImageSource,
    SegmentJob,
    check_outputs,
    find_images,
    image_source,
    open_image,
    outputs,
    run_images,
)

MANIFEST = "manifest.jsonl"
ANNOTATIONS = "annotations.json"
#: Annotation id = image id x this + the mask's index in its image.
ANNOTATIONS_PER_IMAGE = 100_000


@dataclass
class Summary:
    """What a run did: a manifest record per image, in the order given."""

    records: List[Dict] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.records)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    def line(self) -> str:
        return (f"{self.count('done')} done, {self.count('failed')} failed, "
                f"{self.count('skipped')} skipped (done before)")


def file_sha256(image: ImageSource) -> str:
    digest = hashlib.sha256()
    with open_image(image) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def graphs_id(encoder: Path, decoder: Path) -> Dict[str, str]:
    """Which model and graphs made the masks: the model the graphs record, and their names,
    sizes and recorded weights, hashed (the encoder's weights are not read: vit_h's are
    2.5 GB)."""
    from ..graph import metadata
    from ..graph.validate import readable

    parts = []
    for path in (Path(encoder), Path(decoder)):
        record = metadata.read(readable(path))
        parts.append([path.name, path.stat().st_size, record.get("weights"),
                      record.get("contract"), record.get("model_type")])
    return {"model": parts[1][4] or "unrecorded",
            "graphs": hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]}


#: What annotations.json says it is: a file under that name without it is not replaced.
DESCRIPTION = "sam-onnx segment: automatic masks"


def read_manifest(out_dir: Path) -> Dict[str, Dict]:
    """The latest record of each image (by file name) in ``out_dir``'s manifest; lines that
    do not parse (a half line a killed run left) are left out. A manifest.jsonl or an
    annotations.json there that another tool wrote is refused, never appended to or
    replaced."""
    path = Path(out_dir) / MANIFEST
    latest: Dict[str, Dict] = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                latest[record["image"]] = record
            except (ValueError, KeyError, TypeError):
                continue
        if not latest and path.stat().st_size:
            raise SamOnnxError(f"{path} is not a sam-onnx segment manifest; pass another --out "
                               "(it is never appended to or replaced)")
    _check_ours(Path(out_dir) / ANNOTATIONS)
    return latest


def _check_ours(path: Path) -> None:
    """Refuse an annotations.json sam-onnx did not write (it would be replaced)."""
    if not path.exists():
        return
    try:
        ours = json.loads(path.read_text()).get("info", {}).get("description") == DESCRIPTION
    except (ValueError, AttributeError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise SamOnnxError(f"{path} was not written by sam-onnx segment; pass another --out "
                           "(it is never replaced)")


def _append(path: Path, record: Dict) -> None:
    """One manifest line, on disk before the next image is reported."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def plan(images: Sequence[ImageSource], out_dir: Path, graphs: Dict[str, str],
         previous: Dict[str, Dict]) -> Tuple[List[Tuple[ImageSource, Dict]], List[Dict]]:
    """(images to segment, each with its record so far; records of images settled here): an
    image is skipped when it was done for the same bytes and graphs and its outputs exist,
    and failed when it cannot be read to hash (a URI listed but gone). New images get the
    next free ids."""
    next_id = 1 + max((r.get("image_id", 0) for r in previous.values()), default=0)
    todo, settled = [], []
    for image in images:
        before = previous.get(image.name, {})
        record = {"image": image.name, "path": str(image), **graphs,
                  "image_id": before.get("image_id", next_id)}
        if "image_id" not in before:
            next_id += 1
        try:
            record["sha256"] = file_sha256(image)
        except (OSError, SamOnnxError) as exc:
            settled.append({**record, "status": "failed", "seconds": 0.0, "at": time.time(),
                            "reason": f"cannot read {image} ({str(exc).splitlines()[0]})"})
            continue
        if before.get("status") in ("done", "skipped") and \
                before.get("sha256") == record["sha256"] and \
                before.get("graphs") == graphs["graphs"] \
                and all(p.exists() for p in outputs(image, out_dir)):
            settled.append({**before, **record, "status": "skipped", "seconds": 0.0,
                            "at": time.time()})
        else:
            todo.append((image, record))
    return todo, settled


def write_annotations(out_dir: Path, records: Iterable[Dict]) -> Path:
    """annotations.json from the per-image JSON of every done (or skipped) image."""
    images, annotations = [], []
    for record in sorted(records, key=lambda r: r["image_id"]):
        source = Path(out_dir) / f"{Path(record['image']).stem}.json"
        if record["status"] not in ("done", "skipped") or not source.exists():
            continue  # failed, or its outputs removed since
        doc = json.loads(source.read_text())
        image_id = record["image_id"]
        images.append({"id": image_id, **doc["image"]})
        annotations += [{**ann, "id": image_id * ANNOTATIONS_PER_IMAGE + ann["id"],
                         "image_id": image_id, "category_id": 1}
                        for ann in doc["annotations"]]
    dataset = {"info": {"description": DESCRIPTION},
               "images": images, "annotations": annotations,
               "categories": [{"id": 1, "name": "object"}]}
    path = Path(out_dir) / ANNOTATIONS
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(dataset) + "\n"),
                 "pick a writable --out folder")
    return path


def segment_dataset(inputs: Iterable, out_dir, encoder, decoder, *,
                    generator: Optional[Dict] = None, workers: int = 1, threads: int = 0,
                    engine: str = "local", address: Optional[str] = None,
                    providers: Sequence[str] = ("cuda", "cpu"),
                    on_image: Optional[Callable[[Dict], None]] = None,
                    on_batch: Optional[Callable[[int, int], None]] = None) -> Summary:
    """Segment every image of ``inputs`` (files, folders of images) into ``out_dir``; see the
    module docstring. ``generator``: SamOnnxAutomaticMaskGenerator's keyword arguments;
    ``workers``: processes (local) or actors (ray) sharing the images, ``threads`` ONNX
    Runtime's threads in each (0: the cores shared among them); ``address``: the Ray
    cluster to join (``auto``, ``ray://host:port``); ``on_image`` gets each manifest record."""
    if engine not in ENGINES:
        raise SamOnnxError(f"unknown engine {engine!r}; use one of: {', '.join(ENGINES)}")
    if address is not None and engine != "ray":
        raise SamOnnxError("--address is a Ray cluster's: add --engine ray")
    if engine == "ray":
        require_ray()
    out = Path(out_dir)
    images = find_images(inputs)
    check_outputs(images, out)
    out.mkdir(parents=True, exist_ok=True)
    graphs = graphs_id(encoder, decoder)
    previous = read_manifest(out)
    todo, settled = plan(images, out, graphs, previous)
    summary = Summary()
    manifest = out / MANIFEST
    for record in settled:  # skipped, or failed before segmenting
        _append(manifest, record)
        summary.records.append(record)
        if on_image:
            on_image(record)
    job = SegmentJob(encoder, decoder, out, generator or {}, providers, threads)
    known = dict(todo)
    try:
        images_todo = [image for image, _ in todo]
        results = run_images(images_todo, job, workers, on_batch) if engine == "local" else \
            run_on_ray(images_todo, job, workers, address)
        for result in results:
            record = {**known[result.pop("image_path")], **result, "at": time.time()}
            _append(manifest, record)
            summary.records.append(record)
            if on_image:
                on_image(record)
    finally:  # what finished is in the dataset file too, also after Ctrl-C
        latest = {**previous, **{r["image"]: r for r in summary.records}}
        write_annotations(out, latest.values())
    return summary


ENGINES = ("local", "ray")


def require_ray() -> None:
    """Ray Data is an extra: say which, in one line, before any work."""
    from importlib.util import find_spec

    if find_spec("ray") is None or find_spec("ray.data") is None:
        raise SamOnnxError("--engine ray needs Ray Data: pip install 'sam-onnx[ray]' "
                           "(or --engine local)")


class _RayWorker:
    """A Ray Data actor: one Segmenter (one pair of sessions) for every image it gets."""

    def __init__(self, job: SegmentJob) -> None:
        from .segment import Segmenter

        self.segmenter = Segmenter(job)

    def __call__(self, batch: Dict) -> Dict:
        rows = [self.segmenter.segment(image_source(path)) for path in batch["path"]]
        return {"path": [str(r["image_path"]) for r in rows],
                "status": [r["status"] for r in rows],
                "masks": [r.get("masks", -1) for r in rows],
                "reason": [r.get("reason", "") for r in rows],
                "seconds": [r["seconds"] for r in rows]}


def run_on_ray(images: Sequence[ImageSource], job: SegmentJob, actors: int,
               address: Optional[str]) -> Iterator[Dict]:
    """Segment the images on Ray Data, yielding each one's result as it comes back. A local
    Ray (started here, stopped at the end) gets the actors fractional CPUs: on 2 cores two
    1-CPU actors leave none to Ray Data's read task, and the run hangs (measured); half a
    core is kept for it. A dying actor is restarted and its image retried by Ray."""
    import ray

    if not images:
        return
    cores = os.cpu_count() or 1
    owned = not ray.is_initialized()
    if owned:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        total = ray.cluster_resources().get("CPU", cores)
        threads = job.threads or max(1, cores // actors)
        job = SegmentJob(**{**job.__dict__, "threads": threads})
        dataset = ray.data.from_items([{"path": str(p)} for p in images],
                                      override_num_blocks=len(images))
        # Ray Data restarts a dying actor and retries its image (max_restarts and
        # max_task_retries are -1 for actor pools by default)
        results = dataset.map_batches(
            _RayWorker, fn_constructor_kwargs={"job": job}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=max(0.25, (total - 0.5) / actors))
        for row in results.iter_rows():
            result = {"image_path": image_source(row["path"]), "status": row["status"],
                      "seconds": float(row["seconds"])}
            if row["status"] == "done":
                result["masks"] = int(row["masks"])
            else:
                result["reason"] = row["reason"]
            yield result
    finally:
        if owned:
            ray.shutdown()
