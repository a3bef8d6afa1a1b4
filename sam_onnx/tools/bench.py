"""``sam-onnx bench``: PyTorch, ONNX Runtime and other tools' graphs side by side, in one
run, on one machine, image and weights: start-up, encoder, one prompt, automatic mask
generation, peak memory, and how far each pipeline's masks are from PyTorch's.

Each pipeline runs in its own fresh process, so its peak RSS is its own and no pipeline
warms another's caches; with ``rounds`` the pipelines take turns, so a change in the
machine's load falls on all of them. Every timing is a median after a warm-up, with its
spread. ONNX runs once per provider asked for that really runs: a provider that is not
available is reported as skipped with the reason, never as a CPU run under its name.

The encoder's floor is its FLOPs (counted by torch) over the fp32 matrix-multiply rate
measured in the same process, by the same library and threads as that encoder (torch.mm
for PyTorch, a MatMul session for ONNX Runtime), between its timed runs: a load that slows
the encoder slows its floor too. Peers (``tools.peers``) are other tools' graphs made by
their own code and run their way.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import SamOnnxError
from ..core.files import atomic_write
from ..core.processes import run_fresh
from ..core.stages import peak_rss_gib
from ..families import family_of

#: A point prompt in the middle of the image, as the one-prompt latency is measured.
_PROMPT = (0.5, 0.5)


@dataclass(frozen=True)
class BenchConfig:
    model_type: str
    checkpoint: Optional[Path]
    random_weights: bool
    encoder: Path
    decoder: Path
    image: Optional[Path] = None  # None: a synthetic 1024x1024 image
    image_size: Optional[tuple] = None  # (h, w) of a synthetic image instead
    repeat: int = 3
    prompt_repeat: int = 20
    automatic: bool = True
    points_per_side: int = 32
    #: Other tools' pipelines (tools.peers names) and where their graphs are kept.
    peers: Tuple[str, ...] = ()
    peers_dir: Optional[Path] = None
    #: Times each pipeline runs, in turns (a fresh process each).
    rounds: int = 1


@dataclass
class BenchReport:
    config: Dict
    environment: Dict
    pipelines: Dict[str, Dict] = field(default_factory=dict)  # label -> metrics
    skipped: Dict[str, str] = field(default_factory=dict)  # label -> why

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        torch_m = self.pipelines.get("PyTorch", {})
        others = [k for k in self.pipelines if k != "PyTorch"]  # ONNX Runtime's and the peers'
        head = ["metric", "PyTorch"] + [x for k in others for x in (k, "ratio")]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, label, fmt in _ROWS:
            if key not in torch_m and not any(key in self.pipelines[k] for k in others):
                continue
            cells = [label, _cell(torch_m, key, fmt)]
            for k in others:
                m = self.pipelines[k]
                cells.append(_cell(m, key, fmt))
                ratio = (m[key]["median"] if isinstance(m.get(key), dict) else m.get(key))
                base = (torch_m[key]["median"] if isinstance(torch_m.get(key), dict)
                        else torch_m.get(key))
                cells.append(f"{ratio / base:.2f}" if key in _RATIO_KEYS and ratio and base
                             else "")
            lines.append("| " + " | ".join(cells) + " |")
        env = self.environment
        notes = [f"- {k}: not run ({why})" for k, why in self.skipped.items()]
        rounds = self.config.get("rounds", 1)
        notes.append(f"- ratio: pipeline / PyTorch (below 1: faster or smaller); times are "
                     f"medians of {self.config['repeat']} runs after a warm-up"
                     + (f" in each of {rounds} rounds, the pipelines taking turns" if rounds > 1
                        else "") + ", ± the spread (max - min)")
        notes.append(f"- encoder {env['encoder_tflop']:.3f} TFLOP; its floor at the fp32 GEMM "
                     "rate measured between the encoder's runs in each pipeline (" +
                     ", ".join(f"{k} {m['gemm_gflops']:.0f}" for k, m in self.pipelines.items())
                     + " GFLOP/s)")
        for label, peer in self.config.get("peer_docs", {}).items():
            notes.append(f"- {label}: {peer}")
        if any("mask_iou_image" in m for m in self.pipelines.values()):
            notes.append("- mask IoU: each mask a pipeline returns for the centre point, against "
                         "the best-matching of PyTorch's four (multimask and single); the lowest; "
                         "on the image and on it turned 90 degrees")
        versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        threads = ", ".join(f"{k} {v}" for k, v in env["threads"].items())
        notes.append(f"- {env['cpu']}, {env['cores']} cores, threads: {threads}; {versions}")
        return "\n".join(lines + [""] + notes)

    def plot(self, path: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise SamOnnxError("--plot needs matplotlib: pip install 'sam-onnx[plot]'") from None
        keys = [(k, label) for k, label, _ in _ROWS if k in _RATIO_KEYS and k != "peak_rss_gib"]
        keys = [(k, label) for k, label in keys if k in self.pipelines.get("PyTorch", {})]
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
        for ax, (key, label) in zip(axes if len(keys) > 1 else [axes], keys):
            names = list(self.pipelines)
            values = [_median(self.pipelines[n].get(key)) for n in names]
            ax.bar(names, values, color=[_COLORS.get(n.split()[0], "#e8912d") for n in names])
            ax.set_title(label, fontsize=10)
            for i, v in enumerate(values):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        fig.suptitle(f"{self.config['model_type']} on {self.config['image_name']}: "
                     f"{', '.join(self.pipelines)} (lower is better)", fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=110, format="png")
        plt.close(fig)


_ROWS = [
    ("init_s", "start-up: model load / sessions (s)", "{:.2f}"),
    ("encoder_s", "encoder (s)", "{:.2f}"),
    ("encoder_floor_pct", "encoder, % of fp32 GEMM floor", "{:.0f}%"),
    ("prompt_ms", "one prompt incl. upscaling (ms)", "{:.1f}"),
    ("automatic_s", "automatic masks, end to end (s)", "{:.1f}"),
    ("automatic_masks", "automatic masks produced", "{:d}"),
    ("peak_rss_gib", "peak RSS (GiB)", "{:.2f}"),
    ("mask_iou_image", "masks vs PyTorch's, lowest best-match IoU: image", "{:.3f}"),
    ("mask_iou_rotated", "masks vs PyTorch's, lowest best-match IoU: turned 90 degrees",
     "{:.3f}"),
]
#: Bar colours: PyTorch grey, sam-onnx blue, peers orange.
_COLORS = {"PyTorch": "#888888", "ONNX": "#1e90ff"}
_RATIO_KEYS = {"init_s", "encoder_s", "prompt_ms", "automatic_s", "peak_rss_gib"}


def _median(value):
    return value["median"] if isinstance(value, dict) else value


def _cell(metrics: Dict, key: str, fmt: str) -> str:
    value = metrics.get(key)
    if value is None:
        return ""
    if isinstance(value, dict):
        return fmt.format(value["median"]) + (" ± " + fmt.format(value["spread"])
                                              if value["spread"] else "")
    return fmt.format(value)


def timed(fn: Callable, repeat: int, warmup: int = 1) -> Dict:
    """Median and spread (max - min) of ``repeat`` runs after ``warmup`` runs, in seconds."""
    for _ in range(warmup):
        fn()
    return _stats([_seconds(fn) for _ in range(repeat)])


def _seconds(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _stats(times: List[float]) -> Dict:
    return {"median": statistics.median(times), "spread": max(times) - min(times),
            "runs": len(times), "times": times}


def _scaled(t: Dict, factor: float) -> Dict:
    return {**t, "median": t["median"] * factor, "spread": t["spread"] * factor,
            "times": [x * factor for x in t["times"]]}


def _image(cfg: BenchConfig) -> np.ndarray:
    from PIL import Image

    from ..runtime.images import load_image
    from .check import default_images

    if cfg.image is not None:
        return load_image(cfg.image)
    h, w = cfg.image_size or (1024, 1024)
    base = default_images()[0][1]  # a 512x512 test card, resized to the size asked for
    return np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))


class _Predictor:
    """A SamPredictor-like predictor (PyTorch's or sam-onnx's), as the bench drives it."""

    def __init__(self, predictor, generator: Callable) -> None:
        self.predictor, self.generator = predictor, generator

    def encode(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    def prompt(self, point: np.ndarray):
        return self.predictor.predict(point, np.array([1]))

    def masks(self, point: np.ndarray) -> np.ndarray:
        """The three multimask outputs and the single mask (where the decoder returns it)."""
        label = np.array([1])
        found = [self.predictor.predict(point, label)[0]]
        try:
            found.append(self.predictor.predict(point, label, multimask_output=False)[0])
        except SamOnnxError:  # a decoder of the three multimask outputs only (sam2_official)
            pass
        return np.concatenate(found)


def _centre(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return np.array([[w * _PROMPT[0], h * _PROMPT[1]]])


def _measure(side, cfg: BenchConfig, gemm: Callable[[], float]) -> Tuple[Dict, Dict]:
    """Encoder (each run followed by a GEMM measurement: its floor at that moment), one
    prompt, the masks for the centre point on the image and on it turned 90 degrees, and
    automatic masks where the side has a generator; the same way for every pipeline."""
    image = _image(cfg)
    side.encode(image)  # warm-up
    encoder, rates = [], []
    for _ in range(cfg.repeat):
        encoder.append(_seconds(lambda: side.encode(image)))
        rates.append(gemm())
    out = {"encoder_s": _stats(encoder), "gemm_flops_per_s": statistics.median(rates)}
    point = _centre(image)
    out["prompt_ms"] = _scaled(timed(lambda: side.prompt(point), cfg.prompt_repeat, warmup=3),
                               1e3)
    masks = {"image": side.masks(point)}
    rotated = np.ascontiguousarray(np.rot90(image))
    side.encode(rotated)
    masks["rotated"] = side.masks(_centre(rotated))
    if cfg.automatic and getattr(side, "generator", None):
        gen = side.generator(points_per_side=cfg.points_per_side)
        counts = []
        out["automatic_s"] = timed(lambda: counts.append(len(gen.generate(image))),
                                    max(1, cfg.repeat - 1), warmup=0)
        out["automatic_masks"] = counts[-1]
    return out, masks


#: The GEMM whose rate sets an encoder's floor: fp32, 2048^3, as the encoder's library runs it.
_GEMM_N = 2048


def _torch_gemm() -> Callable[[], float]:
    import torch

    a, b = torch.randn(_GEMM_N, _GEMM_N), torch.randn(_GEMM_N, _GEMM_N)
    torch.mm(a, b)
    return lambda: 2 * _GEMM_N ** 3 / min(_seconds(lambda: torch.mm(a, b)) for _ in range(3))


def _onnxruntime_gemm(config) -> Callable[[], float]:
    """A one-MatMul graph in a session made as the encoder's (same providers and threads)."""
    from onnx import TensorProto, helper

    from ..runtime.sessions import create

    square = [_GEMM_N, _GEMM_N]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, square) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, square)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = create(model.SerializeToString(), config, name="GEMM", warn=False)
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal(square, np.float32) for n in "ab"}
    session.run(None, feed)
    return lambda: 2 * _GEMM_N ** 3 / min(_seconds(lambda: session.run(None, feed))
                                          for _ in range(3))


def _torch_pipeline(cfg: BenchConfig) -> Dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..exporter.checkpoints import load_weights
    from ..runtime import transforms

    start = time.perf_counter()
    family = family_of(cfg.model_type)
    side = family.torch()
    sam = load_weights(cfg.model_type, cfg.checkpoint, random_weights=cfg.random_weights,
                       progress=False).sam
    predictor = side.SamPredictor(sam)
    init = time.perf_counter() - start
    out, masks = _measure(_Predictor(predictor, lambda **kw: side.SamAutomaticMaskGenerator(
        sam, **kw)), cfg, _torch_gemm())
    x, _ = transforms.image_to_input(_image(cfg), family.preprocess)
    encoder = side.encoder_module(sam)  # what the encoder graph computes
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder(torch.from_numpy(x))
    return {"init_s": init, **out, "encoder_flops": counter.get_total_flops(),
            "threads": torch.get_num_threads(), "masks": masks, "peak_rss_gib": peak_rss_gib()}


def _onnx_pipeline(cfg: BenchConfig, provider: str) -> Dict:
    from ..runtime.automatic import SamOnnxAutomaticMaskGenerator
    from ..runtime.predictor import SamOnnxPredictor
    from ..runtime.sessions import SessionConfig

    config = SessionConfig(providers=(provider,), strict=True)
    start = time.perf_counter()
    predictor = SamOnnxPredictor(cfg.encoder, cfg.decoder, config)
    init = time.perf_counter() - start
    out, masks = _measure(_Predictor(predictor, lambda **kw: SamOnnxAutomaticMaskGenerator(
        predictor, **kw)), cfg, _onnxruntime_gemm(config))
    return {"init_s": init, **out, "masks": masks,
            "providers": {"encoder": predictor.encoder.active, "decoder": predictor.decoder.active},
            "peak_rss_gib": peak_rss_gib()}


def _peer_pipeline(cfg: BenchConfig, name: str, graphs: Dict[str, Path]) -> Dict:
    from .peers import PEERS

    start = time.perf_counter()
    side = PEERS[name].open(graphs, cfg.model_type, cfg.checkpoint, cfg.random_weights)
    init = time.perf_counter() - start
    gemm = _torch_gemm() if side.gemm_engine() == "torch" else _onnxruntime_gemm(
        _cpu_config())
    out, masks = _measure(side, cfg, gemm)
    return {"init_s": init, **out, "masks": masks, "peak_rss_gib": peak_rss_gib()}


def _cpu_config():
    from ..runtime.sessions import SessionConfig

    return SessionConfig(providers=("cpu",))


def _in_fresh_process(fn, *args) -> Dict:
    return run_fresh(fn, *args, died="a benchmark process died (out of memory?); try a "
                     "smaller --model or image")


def bench(cfg: BenchConfig, providers: Sequence[str] = ("cuda", "cpu"),
          log: Callable[[str], None] = lambda _: None) -> BenchReport:
    """Run PyTorch, ONNX Runtime on each provider and each peer, each in a fresh process,
    ``cfg.rounds`` times in turns."""
    family = family_of(cfg.model_type)
    family.require_torch()
    from ..exporter.checkpoints import sha256
    from ..graph.metadata import library_versions
    from .check import same_weights

    checksum = "random" if cfg.random_weights else (
        "sha256:" + sha256(Path(cfg.checkpoint)) if cfg.checkpoint else None)
    for path in (cfg.encoder, cfg.decoder):
        same_weights(Path(path), checksum)  # None: the official weights, fetched later
    config = {**asdict(cfg), "image_name": Path(cfg.image).name if cfg.image else
              "synthetic {}x{}".format(*(cfg.image_size or (1024, 1024)))}
    report = BenchReport({k: str(v) if isinstance(v, Path) else v for k, v in config.items()}, {})
    runs = _rounds(_plan(cfg, providers, checksum, report, log), cfg.rounds, report, log)
    masks = {label: results[0].pop("masks") for label, results in runs.items()}
    report.pipelines = {label: _merge(results) for label, results in runs.items()}
    t = report.pipelines["PyTorch"]
    flops = t.pop("encoder_flops")
    threads = {"torch": t.pop("threads"), "onnxruntime intra-op": os.cpu_count()}
    for label, metrics in report.pipelines.items():
        gemm = metrics.pop("gemm_flops_per_s")
        metrics["gemm_gflops"] = gemm / 1e9
        metrics["encoder_floor_pct"] = 100 * flops / gemm / metrics["encoder_s"]["median"]
        if label != "PyTorch":
            for orientation, got in masks[label].items():
                metrics[f"mask_iou_{orientation}"] = _best_match(got, masks["PyTorch"][orientation])
    report.environment = {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": threads,
        "platform": platform.platform(),
        "versions": library_versions(), "gemm_gflops": t["gemm_gflops"],
        "encoder_tflop": flops / 1e12, "encoder_floor_s": flops / (t["gemm_gflops"] * 1e9)}
    return report


def _plan(cfg: BenchConfig, providers: Sequence[str], checksum: Optional[str],
          report: BenchReport, log: Callable[[str], None]) -> List[Tuple]:
    """(label, pipeline, its arguments) for PyTorch, each provider that runs here and each
    peer that is installed (its graphs made first); the others go to ``report.skipped``."""
    from ..runtime.sessions import provider_name, unavailable_reason
    from . import peers as peers_

    family = family_of(cfg.model_type)
    plan = [("PyTorch", _torch_pipeline, (cfg,))]
    for provider in providers:
        label = f"ONNX {provider}"
        reason = None if provider == "cpu" else unavailable_reason(provider_name(provider))
        if reason:
            report.skipped[label] = reason
            log(f"{label}: not run ({reason})")
        else:
            plan.append((label, _onnx_pipeline, (cfg, provider)))
    report.config["peer_docs"] = {}
    for peer in peers_.parse(",".join(cfg.peers)):
        reason = peer.missing() or (None if family.name == "sam" else
                                    f"makes graphs of SAM v1 models only, not {cfg.model_type}")
        if reason:
            report.skipped[peer.name] = reason
            log(f"{peer.name}: not run ({reason})")
            continue
        log(f"{peer.name}: its graphs ...")
        graphs = peers_.graphs(peer, cfg.model_type, cfg.checkpoint, cfg.random_weights,
                               checksum or family.checkpoints[cfg.model_type],
                               Path(cfg.peers_dir or Path(cfg.encoder).parent / "peers"))
        plan.append((peer.name, _peer_pipeline, (cfg, peer.name, graphs)))
        report.config["peer_docs"][peer.name] = peer.doc
    return plan


def _rounds(plan: List[Tuple], rounds: int, report: BenchReport,
            log: Callable[[str], None]) -> Dict[str, List[Dict]]:
    """Every pipeline once a round, in turns, each in a fresh process: its results by label.
    A provider whose strict session finds it does not really run is skipped from then on."""
    runs: Dict[str, List[Dict]] = {label: [] for label, _, _ in plan}
    for round_ in range(rounds):
        for label, fn, args in plan:
            if label not in runs:
                continue
            log(f"{label} ..." + (f" (round {round_ + 1} of {rounds})" if rounds > 1 else ""))
            try:
                runs[label].append(_in_fresh_process(fn, *args))
            except SamOnnxError as exc:
                report.skipped[label] = str(exc)
                del runs[label]
    return runs


def _merge(results: List[Dict]) -> Dict:
    """One pipeline's rounds as one: every timed run pooled, a number the median of the
    rounds' (start-up is a timing: one per round)."""
    merged = {}
    for key, first in results[0].items():
        values = [r[key] for r in results]
        if isinstance(first, dict) and "times" in first:
            merged[key] = _stats([t for v in values for t in v["times"]])
        elif key == "init_s":
            merged[key] = _stats(values)
        elif isinstance(first, float):
            merged[key] = statistics.median(values)
        else:
            merged[key] = first
    return merged


def _best_match(masks: np.ndarray, reference: np.ndarray) -> float:
    """The lowest, over ``masks``, of each one's IoU with the best-matching reference mask."""
    from ..core.parity import binary_iou

    return min(max(binary_iou(m, r) for r in reference) for m in masks)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_outputs(report: BenchReport, markdown: Optional[Path], json_path: Optional[Path],
                  plot: Optional[Path]) -> List[Path]:
    writers = [(markdown, lambda tmp, text=report.markdown(): tmp.write_text(text + "\n")),
               (json_path, lambda tmp, text=json.dumps(report.to_dict(), indent=2):
                tmp.write_text(text + "\n")),
               (plot, report.plot)]
    written = []
    for path, write in writers:
        if path:
            atomic_write(Path(path), write, "pass another path")
            written.append(Path(path))
    return written
