"""Compare a graph's outputs with PyTorch's under a declared tolerance (numpy only)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional

import numpy as np

from .contracts import MASK_THRESHOLD, Tolerance

_MASK_OUTPUTS = ("masks", "low_res_masks")


@dataclass(frozen=True)
class OutputParity:
    """How one output of one feed differs from the reference."""

    feed: str
    output: str
    max_abs_err: float
    ref_max_abs: float
    allowed: float
    mask_iou: Optional[float]  # thresholded-mask IoU, for mask-logit outputs

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.allowed

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@dataclass(frozen=True)
class ParityReport:
    graph: str
    precision: str
    tolerance: Tolerance
    rows: List[OutputParity]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def worst(self) -> OutputParity:
        return max(self.rows, key=lambda r: r.max_abs_err / max(r.allowed, 1e-30))

    def to_dict(self) -> dict:
        return {
            "graph": self.graph,
            "precision": self.precision,
            "tolerance": asdict(self.tolerance),
            "passed": self.passed,
            "rows": [r.to_dict() for r in self.rows],
        }

    def summary(self) -> str:
        w = self.worst
        iou = min((r.mask_iou for r in self.rows if r.mask_iou is not None), default=None)
        text = (f"{self.graph} ({self.precision}): max |err| {w.max_abs_err:.2e} on {w.output} "
                f"(allowed {w.allowed:.2e})")
        if iou is not None:
            text += f", min mask IoU {iou:.4f}"
        return text + (" - ok" if self.passed else " - FAILED")


def mask_iou(a: np.ndarray, b: np.ndarray, threshold: float = MASK_THRESHOLD) -> float:
    ma, mb = a > threshold, b > threshold
    union = np.logical_or(ma, mb).sum()
    return 1.0 if union == 0 else float(np.logical_and(ma, mb).sum() / union)


def compare(feed: str, actual: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
            tolerance: Tolerance) -> List[OutputParity]:
    """One row per reference output; a missing or mis-shaped output fails its row."""
    rows = []
    for name, ref in reference.items():
        ref = np.asarray(ref, dtype=np.float64)
        ref_max = float(np.abs(ref).max()) if ref.size else 0.0
        allowed = tolerance.atol + tolerance.rtol * ref_max
        got = actual.get(name)
        if got is None or np.shape(got) != ref.shape:
            rows.append(OutputParity(feed, name, float("inf"), ref_max, allowed, None))
            continue
        got = np.asarray(got, dtype=np.float64)
        err = float(np.abs(got - ref).max()) if ref.size else 0.0
        if not np.isfinite(got).all():
            err = float("inf")
        iou = mask_iou(got, ref) if name in _MASK_OUTPUTS else None
        rows.append(OutputParity(feed, name, err, ref_max, allowed, iou))
    return rows


def report(graph: str, precision: str, tolerance: Tolerance,
           per_feed: Dict[str, tuple]) -> ParityReport:
    """``per_feed`` maps a feed name to (actual outputs, reference outputs)."""
    rows = [row for feed, (act, ref) in per_feed.items() for row in compare(feed, act, ref, tolerance)]
    return ParityReport(graph, precision, tolerance, rows)
