"""Compare a graph's outputs with PyTorch's under a declared tolerance (numpy only)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional

import numpy as np

from .contracts import Tolerance

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
    min_mask_iou: float = 0.0

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.allowed and (
            self.mask_iou is None or self.mask_iou >= self.min_mask_iou)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        """Why the row fails (or how close it is): the error, or the masks' overlap."""
        if self.max_abs_err <= self.allowed and self.mask_iou is not None \
                and self.mask_iou < self.min_mask_iou:
            return f"masks overlap at IoU {self.mask_iou:.4f} < {self.min_mask_iou}"
        return f"max |err| {self.max_abs_err:.3g} (allowed {self.allowed:.3g})"


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
        failed = [r for r in self.rows if not r.passed]
        return max(failed or self.rows, key=lambda r: r.max_abs_err / max(r.allowed, 1e-30))

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


def mask_iou(a: np.ndarray, b: np.ndarray, threshold: float = 0.0) -> float:
    """IoU of two masks given as logits, thresholded at ``threshold`` (every family's
    ``Postprocess.mask_threshold`` is 0: SAM's logits)."""
    return binary_iou(a > threshold, b > threshold)


def binary_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree (1.0)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare(feed: str, actual: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
            tolerance: Tolerance) -> List[OutputParity]:
    """One row per reference output; a missing or mis-shaped output fails its row, and an
    integer output (indices) must be equal."""
    rows = []
    for name, ref in reference.items():
        exact = np.issubdtype(np.asarray(ref).dtype, np.integer)
        ref = np.asarray(ref, dtype=np.float64)
        ref_max = float(np.abs(ref).max()) if ref.size else 0.0
        allowed = 0.0 if exact else tolerance.atol + tolerance.rtol * ref_max
        got = actual.get(name)
        if got is None or np.shape(got) != ref.shape:
            rows.append(OutputParity(feed, name, float("inf"), ref_max, allowed, None))
            continue
        got = np.asarray(got, dtype=np.float64)
        err = float(np.abs(got - ref).max()) if ref.size else 0.0
        if not np.isfinite(got).all():
            err = float("inf")
        iou = mask_iou(got, ref) if name in _MASK_OUTPUTS else None
        rows.append(OutputParity(feed, name, err, ref_max, allowed, iou, tolerance.min_mask_iou))
    return rows


def report(graph: str, precision: str, tolerance: Tolerance,
           per_feed: Dict[str, tuple]) -> ParityReport:
    """``per_feed`` maps a feed name to (actual outputs, reference outputs)."""
    rows = [row for feed, (act, ref) in per_feed.items()
            for row in compare(feed, act, ref, tolerance)]
    return ParityReport(graph, precision, tolerance, rows)


#: The automatic mask generator's gate: same count, matched masks IoU >= 0.98, boxes within
#: a pixel (issue #5).
RECORDS_MIN_IOU = 0.98
RECORDS_MAX_BOX_DIFF = 1.0


@dataclass(frozen=True)
class RecordsParity:
    """How one generator's mask records compare with a reference generator's."""

    reference_count: int
    count: int
    min_iou: float  # over matched records; 1.0 when there are none
    max_box_diff: float  # pixels, XYWH
    max_score_diff: float  # predicted_iou and stability_score
    unmatched: int

    @property
    def passed(self) -> bool:
        return (self.reference_count == self.count and not self.unmatched
                and self.min_iou >= RECORDS_MIN_IOU and self.max_box_diff <= RECORDS_MAX_BOX_DIFF)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare_records(reference: List[dict], records: List[dict]) -> RecordsParity:
    """Match each reference record with the record from the same prompt point and crop whose
    mask overlaps it most; segmentations as binary masks (output_mode="binary_mask")."""
    by_prompt: Dict[tuple, List[dict]] = {}
    for r in records:
        by_prompt.setdefault(_prompt_key(r), []).append(r)
    ious, box_diffs, score_diffs, unmatched = [], [], [], 0
    for ref in reference:
        candidates = by_prompt.get(_prompt_key(ref), [])
        if not candidates:
            unmatched += 1
            continue
        scored = [(binary_iou(ref["segmentation"], c["segmentation"]), c) for c in candidates]
        iou, best = max(scored, key=lambda s: s[0])
        ious.append(iou)
        box_diffs.append(float(np.abs(np.subtract(ref["bbox"], best["bbox"])).max()))
        score_diffs.append(max(abs(ref["predicted_iou"] - best["predicted_iou"]),
                               abs(ref["stability_score"] - best["stability_score"])))
    return RecordsParity(len(reference), len(records), min(ious, default=1.0),
                         max(box_diffs, default=0.0), max(score_diffs, default=0.0), unmatched)


def _prompt_key(record: dict) -> tuple:
    return tuple(np.round(record["point_coords"][0], 3)), tuple(record["crop_box"])

