"""``sam-onnx bench``: PyTorch and ONNX Runtime side by side, in one run, on one machine, image
and weights: start-up, encoder, one prompt, automatic mask generation, peak memory.

Each pipeline runs in its own fresh process, so its peak RSS is its own and no pipeline
warms another's caches. Every timing is a median after a warm-up, with its spread. ONNX
runs once per provider asked for that really runs: a provider that is not available is
reported as skipped with the reason, never as a CPU run under its name. The machine's fp32
matrix-multiply rate and the encoder's FLOPs (counted by torch) give the floor each encoder
is measured against.
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
        onnx_labels = [k for k in self.pipelines if k != "PyTorch"]
        head = ["metric", "PyTorch"] + [x for k in onnx_labels for x in (k, "ratio")]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, label, fmt in _ROWS:
            if key not in torch_m and not any(key in self.pipelines[k] for k in onnx_labels):
                continue
            cells = [label, _cell(torch_m, key, fmt)]
            for k in onnx_labels:
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
        notes.append(f"- ratio: ONNX / PyTorch (below 1: ONNX is faster or smaller); times are "
                     f"medians of {self.config['repeat']} runs after a warm-up, ± the spread "
                     "(max - min)")
        notes.append(f"- fp32 GEMM rate {env['gemm_gflops']:.0f} GFLOP/s (torch.mm, 2048^3), "
                     f"encoder {env['encoder_tflop']:.3f} TFLOP: floor "
                     f"{env['encoder_floor_s']:.2f} s")
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
            ax.bar(names, values, color=["#888888"] + ["#1e90ff"] * (len(names) - 1))
            ax.set_title(label, fontsize=10)
            for i, v in enumerate(values):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        fig.suptitle(f"{self.config['model_type']} on {self.config['image_name']}: PyTorch vs "
                     "ONNX Runtime (lower is better)", fontsize=11)
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
]
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
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
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


def _measure(predictor, make_generator: Callable, cfg: BenchConfig) -> Tuple[Dict, np.ndarray]:
    """Encoder, one prompt and (optionally) automatic masks, the same way for both sides."""
    image = _image(cfg)
    out = {"encoder_s": timed(lambda: predictor.set_image(image), cfg.repeat)}
    h, w = image.shape[:2]
    point = np.array([[w * _PROMPT[0], h * _PROMPT[1]]])
    out["prompt_ms"] = _scaled(timed(lambda: predictor.predict(point, np.array([1])),
                                      cfg.prompt_repeat, warmup=3), 1e3)
    if cfg.automatic:
        gen = make_generator(points_per_side=cfg.points_per_side)
        masks = []
        out["automatic_s"] = timed(lambda: masks.append(len(gen.generate(image))),
                                    max(1, cfg.repeat - 1), warmup=0)
        out["automatic_masks"] = masks[-1]
    return out, image


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
    out, image = _measure(predictor, lambda **kw: side.SamAutomaticMaskGenerator(sam, **kw), cfg)
    x, _ = transforms.image_to_input(image, family.preprocess)
    encoder = side.encoder_module(sam)  # what the encoder graph computes
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder(torch.from_numpy(x))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = timed(lambda: torch.mm(a, b), 10, warmup=3)
    return {"init_s": init, **out, "encoder_flops": counter.get_total_flops(),
            "gemm_flops_per_s": 2 * 2048 ** 3 / mm["median"], "threads": torch.get_num_threads(),
            "peak_rss_gib": peak_rss_gib()}


def _onnx_pipeline(cfg: BenchConfig, provider: str) -> Dict:
    from ..runtime.automatic import SamOnnxAutomaticMaskGenerator
    from ..runtime.predictor import SamOnnxPredictor
    from ..runtime.sessions import SessionConfig

    start = time.perf_counter()
    predictor = SamOnnxPredictor(cfg.encoder, cfg.decoder,
                                 SessionConfig(providers=(provider,), strict=True))
    init = time.perf_counter() - start
    out, _ = _measure(predictor, lambda **kw: SamOnnxAutomaticMaskGenerator(predictor, **kw),
                      cfg)
    return {"init_s": init, **out,
            "providers": {"encoder": predictor.encoder.active, "decoder": predictor.decoder.active},
            "peak_rss_gib": peak_rss_gib()}


def _in_fresh_process(fn, *args) -> Dict:
    return run_fresh(fn, *args, died="a benchmark process died (out of memory?); try a "
                     "smaller --model or image")


def bench(cfg: BenchConfig, providers: Sequence[str] = ("cuda", "cpu"),
          log: Callable[[str], None] = lambda _: None) -> BenchReport:
    """Run PyTorch, then ONNX Runtime on each provider, each in a fresh process."""
    family_of(cfg.model_type).require_torch()
    from ..exporter.checkpoints import sha256
    from ..graph.metadata import library_versions
    from ..runtime.sessions import provider_name, unavailable_reason
    from .check import same_weights

    checksum = "random" if cfg.random_weights else (
        "sha256:" + sha256(Path(cfg.checkpoint)) if cfg.checkpoint else None)
    for path in (cfg.encoder, cfg.decoder):
        same_weights(Path(path), checksum)  # None: the official weights, fetched later
    config = {**asdict(cfg), "image_name": Path(cfg.image).name if cfg.image else
              "synthetic {}x{}".format(*(cfg.image_size or (1024, 1024)))}
    report = BenchReport({k: str(v) if isinstance(v, Path) else v for k, v in config.items()}, {})
    log("PyTorch ...")
    report.pipelines["PyTorch"] = _in_fresh_process(_torch_pipeline, cfg)
    for provider in providers:
        label = f"ONNX {provider}"
        if provider != "cpu":
            reason = unavailable_reason(provider_name(provider))
            if reason:
                report.skipped[label] = reason
                log(f"{label}: not run ({reason})")
                continue
        log(f"{label} ...")
        try:
            report.pipelines[label] = _in_fresh_process(_onnx_pipeline, cfg, provider)
        except SamOnnxError as exc:  # strict sessions: a provider that does not really run
            report.skipped[label] = str(exc)
    t = report.pipelines["PyTorch"]
    flops, gemm = t.pop("encoder_flops"), t.pop("gemm_flops_per_s")
    threads = {"torch": t.pop("threads"), "onnxruntime intra-op": os.cpu_count()}
    floor = flops / gemm
    for metrics in report.pipelines.values():
        metrics["encoder_floor_pct"] = 100 * floor / metrics["encoder_s"]["median"]
    report.environment = {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": threads,
        "platform": platform.platform(),
        "versions": library_versions(), "gemm_gflops": gemm / 1e9,
        "encoder_tflop": flops / 1e12, "encoder_floor_s": floor}
    return report


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
