"""What passes between the export's processes: the job the PyTorch half is given, and what it
leaves staged for the check half (which never imports torch)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Job:
    model_type: str
    checkpoint: Optional[Path]
    random_weights: bool
    contracts: Tuple[str, ...]
    staging_dir: Path
    opset: int
    simplify: bool
    progress: bool


@dataclass
class Staged:
    """What the PyTorch half leaves for the checks: staged graphs and PyTorch's outputs."""

    paths: Dict[str, Path]  # contract name -> staged graph
    records: Dict[str, Dict]  # contract name -> provenance stamped into the graph
    checks: Dict[str, Dict[str, tuple]]  # contract name -> feed name -> (feed, reference)
    timings: Dict[str, float]
