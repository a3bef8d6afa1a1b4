"""Every command under bad input and faults: a table of cases, each run as a user runs it (the
real ``sam-onnx`` in a fresh process, in a folder of its own), and the same assertions for
all: the exit code, one error line that names the problem (and no traceback), every file that
was there before byte-identical, nothing new but what the case may write, and nothing stale
(no staging folder, no part file). New cases go in ``CASES``; faults that need a process
killed midway are the scenarios below the table.
"""
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pytest
from PIL import Image

from sam_onnx.core.files import STAGING_PREFIX
from sam_onnx.tools.dataset import read_manifest


def _image(path: Path, h: int = 60, w: int = 80) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _png_claiming(path: Path, w: int, h: int) -> None:
    """A small PNG whose header claims w x h pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@dataclass
class Case:
    name: str
    args: Sequence[str]  # after "sam-onnx", run in the case's folder
    code: int
    #: What the one error line says (a regex); None for a case that must succeed.
    says: Optional[str]
    setup: Callable[[Path], None] = lambda d: None
    #: New files the case may leave (names relative to its folder).
    writes: Sequence[str] = ()
    #: A file size limit for the process, in bytes (a full disk, as the writer sees it).
    file_limit: Optional[int] = None
    env: dict = field(default_factory=dict)


ENC, DEC = "g/tiny_encoder.onnx", "g/tiny_decoder_official.onnx"
GRAPHS = ["--encoder", ENC, "--decoder", DEC]
PREDICT = ["predict", "img.jpg", *GRAPHS, "--point", "20,30"]


def _unlink(name):
    return lambda d: (d / name).unlink()


def _truncate(name, size):
    def cut(d):
        data = (d / name).read_bytes()[:size]
        (d / name).write_bytes(data)
    return cut


def _write(name, data: bytes):
    return lambda d: ((d / name).parent.mkdir(parents=True, exist_ok=True),
                      (d / name).write_bytes(data))


CASES = [
    # -- data lost: an input is never overwritten ---------------------------------------
    Case("predict --out is the input image", [*PREDICT, "--out", "img.jpg"], 1,
         r"--out img\.jpg is the input img\.jpg; pass another path \(an input is never "
         r"overwritten\)"),
    Case("predict --overlay is the input image", [*PREDICT, "--overlay", "img.jpg"], 1,
         r"--overlay img\.jpg is the input img\.jpg"),
    Case("predict --out is the decoder", [*PREDICT, "--out", DEC], 1,
         r"--out g/tiny_decoder_official\.onnx is the input"),
    Case("predict --out and --overlay the same file",
         [*PREDICT, "--out", "m.png", "--overlay", "m.png"], 2, "name the same file"),
    Case("segment --out is the images' own folder",
         ["segment", "imgs", *GRAPHS, "--out", "imgs", "--points-per-side", "2"], 1,
         r"imgs/b\.png is an input, and b's overlay would be written over it",
         setup=lambda d: ((d / "imgs").mkdir(), _image(d / "imgs" / "a.jpg"),
                          _image(d / "imgs" / "b.png"))),
    Case("repair -o is the input", ["repair", DEC, "-o", DEC, "--rename", "masks=m"], 1,
         r"is the input; pass --in-place"),
    Case("export over a file that is not a manifest",
         ["export", "--model", "tiny", "--random-weights", "--out", "o"], 1,
         r"o/tiny_manifest\.json is not a sam-onnx manifest .*; move it away",
         setup=_write("o/tiny_manifest.json", b"my notes\n")),
    # -- broken graphs: validate's one line, not a traceback ----------------------------
    Case("predict, encoder missing", [*PREDICT[:2], "--encoder", "none.onnx", "--decoder", DEC,
                                      "--point", "20,30"], 1, r"none\.onnx does not exist"),
    Case("predict, encoder random bytes", PREDICT, 1, r"is not an ONNX model",
         setup=_write(ENC, os.urandom(5000))),
    Case("predict, decoder truncated", PREDICT, 1, r"damaged or truncated ONNX file",
         setup=_truncate(DEC, 100_000)),
    Case("predict, encoder .data missing", PREDICT, 1,
         r"external data file tiny_encoder\.onnx\.data is missing beside tiny_encoder\.onnx; "
         r"copy", setup=_unlink(ENC + ".data")),
    Case("predict, encoder .data truncated", PREDICT, 1,
         r"tiny_encoder\.onnx\.data has 1000 bytes, tensors need \d+; copy .* again",
         setup=_truncate(ENC + ".data", 1000)),
    Case("predict, decoder is an image", [*PREDICT[:2], "--encoder", ENC, "--decoder",
                                          "img.jpg", "--point", "20,30"], 1,
         r"img\.jpg is not an ONNX model"),
    Case("segment, decoder truncated", ["segment", "img.jpg", *GRAPHS, "--out", "o"], 1,
         r"damaged or truncated ONNX file", setup=_truncate(DEC, 100_000)),
    Case("segment, encoder .data missing", ["segment", "img.jpg", *GRAPHS, "--out", "o"], 1,
         r"external data file .* is missing", setup=_unlink(ENC + ".data")),
    Case("repair, encoder .data missing", ["repair", ENC, "-o", "r.onnx", "--opset", "19"], 1,
         r"external data file .* is missing", setup=_unlink(ENC + ".data")),
    Case("repair, random bytes", ["repair", "x.onnx", "-o", "r.onnx", "--opset", "19"], 1,
         r"x\.onnx is not an ONNX model", setup=_write("x.onnx", os.urandom(3000))),
    Case("check, decoder truncated", ["check", "--model", "tiny", "--random-weights",
                                      *GRAPHS], 1, r"damaged or truncated",
         setup=_truncate(DEC, 100_000)),
    Case("check --model of another size than the graphs",
         ["check", "--model", "vit_b", "--random-weights", *GRAPHS], 1,
         r"tiny_encoder\.onnx is a tiny graph, not vit_b: pass --model tiny"),
    # -- prompts: what each label means, said before the graphs load --------------------
    Case("label 7, before the encoder loads",  # the encoder is missing: the prompt comes first
         ["predict", "img.jpg", "--encoder", "none.onnx", "--decoder", DEC, "--point",
          "20,30,7"], 1, r"point label 7 is not a SAM label \(1 foreground, 0 background, "
         r"2 a box's top-left corner, 3 a box's bottom-right corner, -1 padding, ignored\)"),
    Case("only padding points", [*PREDICT[:-1], "20,30,-1"], 1,
         r"every point is labelled -1 \(padding, which SAM ignores\)"),
    Case("a lone box corner", [*PREDICT[:-1], "20,30,2"], 1,
         r"labels 2 and 3 mark a box's top-left and bottom-right corners and come in pairs"),
    Case("a point far outside the image", [*PREDICT[:-1], "9000,30"], 1,
         r"far outside the 80x60 image"),
    Case("a malformed point", [*PREDICT[:-1], "20"], 2, r"--point takes 2 or 3"),
    # -- output paths: refused before the graphs load -----------------------------------
    Case("--out in a folder that does not exist",
         ["predict", "img.jpg", "--encoder", "none.onnx", "--decoder", DEC, "--point", "20,30",
          "--out", "nowhere/m.png"], 1, r"folder nowhere does not exist"),
    Case("--out under a file", [*PREDICT, "--out", "img.jpg/m.png"], 1,
         r"folder img\.jpg does not exist"),
    Case("--out is a folder", [*PREDICT, "--out", "g"], 1, r"--out g is a folder"),
    Case("--out where nothing may be written", [*PREDICT, "--out", "/proc/m.png"], 1,
         r"cannot write /proc/m\.png|/proc/m\.png: folder /proc cannot be written"),
    Case("export --out under a file",
         ["export", "--model", "tiny", "--random-weights", "--out", "img.jpg/o"], 1,
         r"cannot write to output folder img\.jpg/o"),
    Case("bench --json is the input image", ["bench", "--model", "tiny", "--random-weights",
                                             *GRAPHS, "--image", "img.jpg", "--json",
                                             "img.jpg"], 1, r"--json img\.jpg is the input"),
    Case("bench --out in a folder that does not exist",
         ["bench", "--model", "tiny", "--random-weights", *GRAPHS, "--out", "nowhere/b.md"], 1,
         r"--out nowhere/b\.md: folder nowhere does not exist"),
    Case("segment --out is a file", ["segment", "img.jpg", *GRAPHS, "--out", "img.jpg"], 1,
         r"--out img\.jpg is a file; pass a folder"),
    # -- a full disk (a file size limit, as the writer sees it) -------------------------
    Case("predict, disk full", [*PREDICT, "--out", "m.png"], 1,
         r"cannot write m\.png \(File too large\)", file_limit=64),
    Case("export, disk full", ["export", "--model", "tiny", "--random-weights", "--out", "o"],
         1, r"cannot write the graphs to o \(File too large\); free space there",
         file_limit=2**20, writes=["o"]),
    # -- images: huge, tiny, empty, damaged, not images ---------------------------------
    Case("a 1x1 image", ["predict", "one.png", *GRAPHS, "--point", "0,0", "--out", "m.png"],
         0, None, setup=lambda d: _image(d / "one.png", 1, 1), writes=["m.png"]),
    Case("an image claiming 30000x30000 pixels",
         ["predict", "bomb.png", *GRAPHS, "--point", "0,0"], 1,
         r"image bomb\.png is too large to read safely .*; downscale it",
         setup=lambda d: _png_claiming(d / "bomb.png", 30000, 30000)),
    Case("an empty image file", ["predict", "e.jpg", *GRAPHS, "--point", "0,0"], 1,
         r"cannot read image e\.jpg", setup=_write("e.jpg", b"")),
    Case("a truncated JPEG", ["predict", "img.jpg", *GRAPHS, "--point", "0,0"], 1,
         r"cannot read image img\.jpg \(.*[Tt]runcated.*\); check that it is a whole image",
         setup=_truncate("img.jpg", 600)),
    Case("text named .png", ["predict", "t.png", *GRAPHS, "--point", "0,0"], 1,
         r"cannot read image t\.png", setup=_write("t.png", b"hello\n")),
    # -- odd paths ------------------------------------------------------------------------
    Case("spaces and non-ASCII in every path",
         ["predict", "my ïmage.jpg", "--encoder", "gräphs x/tiny_encoder.onnx", "--decoder",
          "gräphs x/tiny_decoder_official.onnx", "--point", "20,30", "--out", "out ä/m ü.png"],
         0, None, setup=lambda d: (shutil.copytree(d / "g", d / "gräphs x"),
                                   shutil.copy(d / "img.jpg", d / "my ïmage.jpg"),
                                   (d / "out ä").mkdir()),
         writes=["out ä/m ü.png"]),
    # -- what a killed run left is cleaned by the next one -------------------------------
    Case("a part file a killed predict left", [*PREDICT, "--out", "m.png"], 0, None,
         setup=_write(".m.png.999999.part", b"half a png"), writes=["m.png"]),
]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _stale(folder: Path) -> list:
    return [str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.name.startswith(STAGING_PREFIX) or p.name.endswith(".part")]


def _run(args, cwd: Path, env=None, file_limit=None, timeout=300):
    def limit():
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    return subprocess.run([sys.executable, "-m", "sam_onnx.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, preexec_fn=limit)


def _error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("Error")]


@pytest.fixture
def case_dir(tmp_path, tiny_export):
    """A folder with the tiny graphs (g/) and an 80x60 image (img.jpg)."""
    out, _ = tiny_export
    (tmp_path / "g").mkdir()
    for p in out.iterdir():
        if p.suffix in (".onnx", ".data"):
            shutil.copy(p, tmp_path / "g" / p.name)
    _image(tmp_path / "img.jpg")
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case_dir, case):
    case.setup(case_dir)
    before = _snapshot(case_dir)
    proc = _run(case.args, case_dir, case.env, case.file_limit)
    assert proc.returncode == case.code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = _error_lines(proc.stderr)
    if case.says is None:
        assert errors == [], proc.stderr
    else:
        assert len(errors) == 1, proc.stderr
        assert re.search(case.says, errors[0]), errors[0]
    after = _snapshot(case_dir)
    assert {k: after.get(k) for k in before if not k.startswith(".")} == \
        {k: v for k, v in before.items() if not k.startswith(".")}, "an input changed"
    new = set(after) - set(before)
    assert {n for n in new if not any(n == w or n.startswith(w + "/") for w in case.writes)} \
        == set(), "wrote files it should not have"
    assert _stale(case_dir) == []


def test_debug_shows_the_traceback_of_an_expected_error(case_dir):
    proc = _run(["--debug", "predict", "img.jpg", "--encoder", "none.onnx", "--decoder", DEC,
                 "--point", "20,30"], case_dir)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "SamOnnxError" in proc.stderr
    assert _error_lines(proc.stderr) == ["Error: none.onnx does not exist; check the path"]


# -- scenarios: processes killed midway, runs at the same time --------------------------
def _export_cmd(out: Path, *extra):
    return [sys.executable, "-m", "sam_onnx.cli", "export", "--model", "tiny",
            "--random-weights", "--out", str(out), *extra]


def _wait_for_staged_graph(proc, out: Path):
    deadline = time.time() + 120
    while not any(p.suffix == ".onnx" for s in out.glob(STAGING_PREFIX + "*")
                  for p in s.iterdir()):
        assert time.time() < deadline and proc.poll() is None, "export never staged a graph"
        time.sleep(0.05)


def test_sigterm_during_export_cleans_up_and_says_so(tmp_path):
    proc = subprocess.Popen(_export_cmd(tmp_path), stderr=subprocess.PIPE, text=True)
    _wait_for_staged_graph(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert _error_lines(stderr) == ["Error: terminated (SIGTERM); nothing was written under "
                                    "the final names"]
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_the_next_export_removes_what_a_killed_one_left(tmp_path):
    proc = subprocess.Popen(_export_cmd(tmp_path), stderr=subprocess.DEVNULL)
    _wait_for_staged_graph(proc, tmp_path)
    proc.kill()
    proc.wait()
    [left] = tmp_path.glob(STAGING_PREFIX + "*")  # SIGKILL: no clean-up could run
    again = _run(["export", "--model", "tiny", "--random-weights", "--out", ".",
                  "--no-encoder"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert re.search(rf"removed \S*{left.name} \([\d.]+ MB\), left by an earlier run that "
                     "was killed", again.stderr), again.stderr
    assert _stale(tmp_path) == []


def test_only_what_a_gone_process_left_is_removed(tmp_path):
    """A staging folder or part file is removed only when the pid in its name is not running
    and nobody holds its lock: one a live process just made (not locked yet) stays."""
    from sam_onnx.core.files import Staging, part_file

    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no running process
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-justmade"
    dead = tmp_path / f"{STAGING_PREFIX}{gone.pid}-killed"
    left_part = tmp_path / f".m.png.{gone.pid}.part"
    for folder in (live, dead):
        folder.mkdir()
    (tmp_path / f".m.png.{os.getpid()}.part").write_bytes(b"being written")
    left_part.write_bytes(b"left")
    with Staging(tmp_path):
        pass
    assert live.exists() and not dead.exists()
    with part_file(tmp_path / "n.png") as tmp:
        tmp.write_bytes(b"n")
    with part_file(tmp_path / "m.png") as tmp:
        tmp.write_bytes(b"m")
    assert not left_part.exists() and (tmp_path / "m.png").read_bytes() == b"m"


def test_two_exports_into_one_folder_keep_both_records(tmp_path):
    """Run at the same time: the official and the lowres decoder, one manifest with both."""
    procs = [subprocess.Popen(_export_cmd(tmp_path, "--no-encoder", "--decoder-contract", c),
                              stderr=subprocess.PIPE, text=True)
             for c in ("official", "lowres")]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    manifest = json.loads((tmp_path / "tiny_manifest.json").read_text())
    graphs = {g["path"]: g for g in manifest["graphs"]}
    assert set(graphs) == {"tiny_decoder_official.onnx", "tiny_decoder_lowres.onnx"}
    assert all(g["parity"]["passed"] for g in graphs.values())
    assert len(manifest["exports"]) == 2
    assert {g["export"] for g in graphs.values()} == {e["id"] for e in manifest["exports"]}
    assert _stale(tmp_path) == []


def test_a_second_in_place_repair_keeps_the_first_backup(case_dir):
    original = (case_dir / DEC).read_bytes()
    first = _run(["repair", DEC, "--in-place", "--rename", "masks=m1"], case_dir)
    assert first.returncode == 0, first.stderr
    after_first = (case_dir / DEC).read_bytes()
    second = _run(["repair", DEC, "--in-place", "--rename", "m1=m2"], case_dir)
    assert second.returncode == 0, second.stderr
    assert (case_dir / (DEC + ".bak")).read_bytes() == original
    assert (case_dir / (DEC + ".bak.1")).read_bytes() == after_first
    assert f"backup   {DEC}.bak.1" in second.stdout
    assert _stale(case_dir) == []


def test_sigterm_during_segment_keeps_finished_images_whole(case_dir):
    """The manifest says what finished: those images are in annotations.json with their
    files. An image whose files were written but not yet recorded when the signal came (the
    window between a worker's last write and the manifest line) is whole and is redone."""
    images = case_dir / "imgs"
    images.mkdir()
    for i in range(6):
        _image(images / f"i{i}.jpg", 200, 240)
    proc = subprocess.Popen([sys.executable, "-m", "sam_onnx.cli", "segment", "imgs", *GRAPHS,
                             "--out", "o", "--points-per-side", "8"], cwd=case_dir,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    manifest = case_dir / "o" / "manifest.jsonl"
    deadline = time.time() + 120
    while not (manifest.exists() and manifest.read_text().endswith("\n")):
        assert time.time() < deadline and proc.poll() is None, "no image was segmented"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert _error_lines(stderr) == ["Error: terminated (SIGTERM); images finished before it "
                                    "keep their JSON and overlay and are in manifest.jsonl and "
                                    "annotations.json; none is half-written; run the same "
                                    "command again to go on"]
    done = sorted(Path(name).stem for name, record in read_manifest(case_dir / "o").items()
                  if record["status"] == "done")
    assert 1 <= len(done) < 6
    dataset = json.loads((case_dir / "o" / "annotations.json").read_text())
    assert sorted(Path(i["file_name"]).stem for i in dataset["images"]) == done
    written = sorted(p.stem for p in (case_dir / "o").glob("i*.json"))
    assert set(done) <= set(written) and len(written) <= len(done) + 1
    for stem in written:
        json.loads((case_dir / "o" / f"{stem}.json").read_text())  # whole, parses
    for png in (case_dir / "o").glob("*.png"):
        assert png.stem in written
        Image.open(png).load()
    assert _stale(case_dir) == []
