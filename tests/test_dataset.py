"""``sam-onnx segment`` over a dataset: failed images recorded and the run going on, the
manifest and annotations.json, resuming, and a killed run losing nothing it finished."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli
from PIL import Image

import sam_onnx
from sam_onnx.runtime.images import synthetic
from sam_onnx.tools.dataset import ANNOTATIONS, ANNOTATIONS_PER_IMAGE, MANIFEST, read_manifest

FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def _ray():
    """The Ray engine's tests need the ray extra (in dev: CI has it)."""
    return pytest.importorskip("ray.data", reason="the ray extra is not installed")


@pytest.fixture(scope="module")
def graphs(tiny_export, tiny_batched):
    return ["--encoder", tiny_export[0] / "tiny_encoder.onnx", "--decoder", tiny_batched]


def _images(folder, n=4, corrupt=()):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(synthetic(120 + 10 * i, 160)).save(folder / f"img{i}.png")
    for name in corrupt:
        good = (folder / "img0.png").read_bytes()
        (folder / name).write_bytes(good[: len(good) // 3])  # truncated
    return folder


def _manifest_lines(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def test_a_corrupt_image_is_recorded_the_others_done_and_a_rerun_redoes_only_it(graphs,
                                                                               tmp_path):
    folder = _images(tmp_path / "imgs", corrupt=["broken.png"])
    out = tmp_path / "out"
    proc = run_cli("segment", folder, *graphs, "--out", out, *FAST)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "4 done, 1 failed, 0 skipped" in proc.stdout
    latest = read_manifest(out)
    assert latest["broken.png"]["status"] == "failed"
    assert {r["model"] for r in latest.values()} == {"tiny"}
    assert all(len(r["sha256"]) == 64 and r["graphs"] for r in latest.values())
    assert "broken.png" in latest["broken.png"]["reason"] or "truncated" in \
        latest["broken.png"]["reason"]
    assert {k for k, r in latest.items() if r["status"] == "done"} == \
        {f"img{i}.png" for i in range(4)}
    dataset = json.loads((out / ANNOTATIONS).read_text())
    assert sorted(i["file_name"] for i in dataset["images"]) == [f"img{i}.png" for i in range(4)]
    first_ids = {i["file_name"]: i["id"] for i in dataset["images"]}
    ann_ids = sorted(a["id"] for a in dataset["annotations"])
    assert len(set(ann_ids)) == len(ann_ids) and dataset["annotations"]
    for ann in dataset["annotations"]:
        assert ann["id"] // ANNOTATIONS_PER_IMAGE == ann["image_id"]

    rerun = run_cli("segment", folder, *graphs, "--out", out, *FAST)
    assert rerun.returncode == 1 and "0 done, 1 failed, 4 skipped" in rerun.stdout

    Image.fromarray(synthetic(100, 100)).save(folder / "broken.png")  # fixed
    (folder / "img1.png").write_bytes((folder / "img2.png").read_bytes())  # changed
    third = run_cli("segment", folder, *graphs, "--out", out, *FAST)
    assert third.returncode == 0, third.stderr
    assert "2 done, 0 failed, 3 skipped" in third.stdout
    dataset = json.loads((out / ANNOTATIONS).read_text())
    ids = {i["file_name"]: i["id"] for i in dataset["images"]}
    assert {k: ids[k] for k in first_ids} == first_ids  # ids stable across re-runs
    assert len(ids) == 5 and len(set(ids.values())) == 5


def test_other_graphs_redo_every_image(graphs, tiny_export, tmp_path):
    folder = _images(tmp_path / "imgs", n=2)
    out = tmp_path / "out"
    assert run_cli("segment", folder, *graphs, "--out", out, *FAST).returncode == 0
    official = ["--encoder", graphs[1], "--decoder", tiny_export[0] / "tiny_decoder_official.onnx"]
    proc = run_cli("segment", folder, *official, "--out", out, *FAST)
    assert proc.returncode == 0 and "2 done, 0 failed, 0 skipped" in proc.stdout


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_killed_run_resumes_without_losing_or_repeating_an_image(graphs, tmp_path, engine):
    """SIGKILL of the command mid-run (for Ray, the driver: the local Ray it started goes
    with it), then the same command: every image once in annotations.json."""
    if engine == "ray":
        _ray()
    folder = _images(tmp_path / "imgs", n=6)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sam_onnx.cli", "segment", str(folder),
                             *map(str, graphs), "--out", str(out), "--points-per-side", "8",
                             "--engine", engine],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / MANIFEST).exists() or not _manifest_lines(out):
        assert time.time() < deadline and proc.poll() is None, "no image was finished"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    finished = {r["image"] for r in _manifest_lines(out)}
    assert 1 <= len(finished) < 6
    rerun = run_cli("segment", folder, *graphs, "--out", out, "--points-per-side", "8",
                    "--engine", engine, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(finished)} skipped" in rerun.stdout
    dataset = json.loads((out / ANNOTATIONS).read_text())
    names = [i["file_name"] for i in dataset["images"]]
    assert sorted(names) == [f"img{i}.png" for i in range(6)]  # each image exactly once
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no part file left


def test_segment_dataset_is_the_librarys_call(graphs, tmp_path):
    folder = _images(tmp_path / "imgs", n=2, corrupt=["bad.png"])
    summary = sam_onnx.segment_dataset(
        [folder], tmp_path / "out", graphs[1], graphs[3], providers=("cpu",),
        generator=dict(points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0))
    assert not summary.ok and summary.line() == "2 done, 1 failed, 0 skipped (done before)"
    assert [r["status"] for r in summary.records].count("done") == 2


# -- the Ray engine (a local Ray, started by the command itself) ---------------------------
def test_ray_engine_records_a_corrupt_image_and_a_rerun_redoes_only_it(graphs, tmp_path):
    """The images given as a file:// URI: the actors read them through pyarrow.fs."""
    _ray()
    folder = _images(tmp_path / "imgs", corrupt=["broken.png"])
    out = tmp_path / "out"
    proc = run_cli("segment", folder.as_uri(), *graphs, "--out", out, *FAST, "--engine",
                   "ray", "--workers", "2", timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "4 done, 1 failed, 0 skipped" in proc.stdout
    assert read_manifest(out)["img3.png"]["path"] == f"{folder.as_uri()}/img3.png"
    rerun = run_cli("segment", folder.as_uri(), *graphs, "--out", out, *FAST, "--engine",
                    "ray", timeout=600)
    assert rerun.returncode == 1 and "0 done, 1 failed, 4 skipped" in rerun.stdout


def test_ray_engine_records_equal_the_local_engines(graphs, tmp_path):
    _ray()
    from sam_onnx.core.parity import compare_records
    from sam_onnx.runtime import amg

    folder = _images(tmp_path / "imgs", n=3)
    for engine in ("local", "ray"):
        proc = run_cli("segment", folder, *graphs, "--out", tmp_path / engine, *FAST,
                       "--engine", engine, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def records(engine, stem):
        doc = json.loads((tmp_path / engine / f"{stem}.json").read_text())
        return [{**a, "segmentation": amg.rle_to_mask(amg.coco_decode_rle(a["segmentation"]))}
                for a in doc["annotations"]]

    for i in range(3):
        local, ray = records("local", f"img{i}"), records("ray", f"img{i}")
        parity = compare_records(local, ray)
        assert len(local) == len(ray) and parity.passed and parity.min_iou >= 0.99


def test_ray_engine_survives_a_killed_actor_each_image_exactly_once(graphs, tmp_path):
    _ray()
    folder = _images(tmp_path / "imgs", n=6)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sam_onnx.cli", "segment", str(folder),
                             *map(str, graphs), "--out", str(out), "--points-per-side", "12",
                             "--engine", "ray", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / MANIFEST).exists() or not _manifest_lines(out):
            assert time.time() < deadline and proc.poll() is None, "no image was finished"
            time.sleep(0.1)
        actors = subprocess.run(["pgrep", "-f", "MapWorker"], capture_output=True, text=True)
        pids = [int(p) for p in actors.stdout.split()]
        assert pids, "no Ray Data actor process found"
        os.kill(pids[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "6 done, 0 failed" in stdout
    assert sorted(r["image"] for r in _manifest_lines(out)) == [f"img{i}.png" for i in range(6)]
    dataset = json.loads((out / ANNOTATIONS).read_text())
    assert sorted(i["file_name"] for i in dataset["images"]) == [f"img{i}.png" for i in range(6)]


def test_ray_engine_without_ray_or_with_a_stray_address_says_what_to_do(graphs, tmp_path):
    folder = _images(tmp_path / "imgs", n=1)
    proc = run_cli("segment", folder, *graphs, "--out", tmp_path / "o", "--address", "auto")
    assert proc.returncode == 1 and "--address is a Ray cluster's: add --engine ray" in \
        proc.stderr


def test_images_from_globs_list_files_and_uris(tmp_path):
    from sam_onnx.core.errors import SamOnnxError
    from sam_onnx.tools.segment import RemoteImage, check_outputs, find_images

    folder = _images(tmp_path / "imgs", n=3)
    (tmp_path / "list.txt").write_text("# the first two\nimgs/img0.png\n\nimgs/img1.png\n"
                                       f"{(folder / 'img2.png').as_uri()}\n")
    assert find_images([tmp_path / "list.txt"]) == [folder / "img0.png", folder / "img1.png",
                                                    RemoteImage(f"{folder.as_uri()}/img2.png")]
    assert find_images([f"{folder}/img[12].png"]) == [folder / "img1.png", folder / "img2.png"]
    assert find_images([f"{tmp_path}/**/*.png"]) == [folder / f"img{i}.png" for i in range(3)]
    # a URI through pyarrow.fs, as Ray Data reads it: a folder, a pattern, one file
    remote = [RemoteImage(f"{folder.as_uri()}/img{i}.png") for i in range(3)]
    assert find_images([folder.as_uri()]) == remote
    assert find_images([f"{folder.as_uri()}/img[12].png"]) == remote[1:]
    assert find_images([remote[0].uri]) == remote[:1] and remote[0].stem == "img0"
    for bad, words in (([f"{folder}/*.tif"], "matches no images"),
                       ([f"{folder.as_uri()}/*.tif"], "matches no images"),
                       ([f"{folder.as_uri()}/nope"], "does not exist"),
                       (["nosuch://bucket/images"], "cannot open its filesystem .* give a URI "
                                                    "pyarrow.fs reads"),
                       ([tmp_path / "missing.txt"], "does not exist")):
        with pytest.raises(SamOnnxError, match=words):
            find_images(bad)
    (tmp_path / "bad.txt").write_text("imgs/nope.png\n")
    with pytest.raises(SamOnnxError, match="listed in"):
        find_images([tmp_path / "bad.txt"])
    with pytest.raises(SamOnnxError, match="img0.png is an input"):  # file:// ones as well
        check_outputs(remote, folder)
    spaced = tmp_path / "a folder"  # percent-encoded in a URI, decoded for names and paths
    spaced.mkdir()
    Image.fromarray(synthetic(40, 40)).save(spaced / "an image.png")
    (found,) = find_images([spaced.as_uri()])
    assert found.name == "an image.png" and found.open().read() == \
        (spaced / "an image.png").read_bytes()
    with pytest.raises(SamOnnxError, match="an%20image.png is an input"):
        check_outputs([found], spaced)


def test_a_uri_without_pyarrow_says_which_extra(monkeypatch):
    from sam_onnx.core.errors import SamOnnxError
    from sam_onnx.tools.segment import find_images

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as where it is not installed
    with pytest.raises(SamOnnxError, match=r"reading URIs needs pyarrow: pip install "
                                           r"'sam-onnx\[ray\]'"):
        find_images(["s3://bucket/images"])


def test_images_at_a_uri_give_the_files_records_and_resume(graphs, tmp_path):
    """The local engine reading a folder by its file:// URI (pyarrow.fs, the code path an
    s3:// or gs:// one takes): the same JSON as by its path, the URI in the manifest, a
    re-run skips every image, a corrupt one is recorded by its URI."""
    folder = _images(tmp_path / "imgs", n=2, corrupt=["broken.png"])
    for name, source in (("by_path", folder), ("by_uri", folder.as_uri())):
        proc = run_cli("segment", source, *graphs, "--out", tmp_path / name, *FAST)
        assert proc.returncode == 1 and "2 done, 1 failed, 0 skipped" in proc.stdout, \
            proc.stderr[-3000:]
    for i in range(2):
        assert (tmp_path / "by_uri" / f"img{i}.json").read_text() == \
            (tmp_path / "by_path" / f"img{i}.json").read_text()
    latest = read_manifest(tmp_path / "by_uri")
    assert latest["img0.png"]["path"] == f"{folder.as_uri()}/img0.png"
    assert latest["img0.png"]["sha256"] == read_manifest(tmp_path / "by_path")["img0.png"][
        "sha256"]
    assert "file://" in latest["broken.png"]["reason"]
    rerun = run_cli("segment", folder.as_uri(), *graphs, "--out", tmp_path / "by_uri", *FAST)
    assert rerun.returncode == 1 and "0 done, 1 failed, 2 skipped" in rerun.stdout
    # a listed URI that is gone: recorded failed in one line, the others go on
    (tmp_path / "list.txt").write_text(f"{folder.as_uri()}/gone.png\nimgs/img0.png\n")
    gone = run_cli("segment", tmp_path / "list.txt", *graphs, "--out", tmp_path / "list",
                   *FAST)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr, gone.stderr[-3000:]
    assert "1 done, 1 failed, 0 skipped" in gone.stdout
    assert read_manifest(tmp_path / "list")["gone.png"]["reason"].startswith(
        f"cannot read {folder.as_uri()}/gone.png")


def test_another_tools_annotations_or_manifest_in_out_is_refused_and_kept(graphs, tmp_path):
    folder = _images(tmp_path / "imgs", n=1)
    for name, text in ((ANNOTATIONS, '{"images": [], "annotations": []}\n'),
                       (MANIFEST, "not a manifest\n")):
        out = tmp_path / f"out_{name}"
        out.mkdir()
        (out / name).write_text(text)
        proc = run_cli("segment", folder, *graphs, "--out", out, *FAST)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"{out / name}" in proc.stderr and "never" in proc.stderr
        assert (out / name).read_text() == text  # untouched
        assert sorted(p.name for p in out.iterdir()) == [name]  # nothing segmented
