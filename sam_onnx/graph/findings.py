"""Findings and reports: what the validator says about a graph, as data and as text.

Each finding has a stable rule code (users grep and suppress by it), a severity, the
target it is about, expected vs actual, the ONNX Runtime error it predicts, and the fix.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import List, Optional

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    code: str
    name: str
    severity: str
    target: str  # "model", "input:point_coords", "output:masks", "feed:has_mask_input"...
    message: str
    fix: str = ""
    expected: Optional[str] = None
    actual: Optional[str] = None
    ort_error: Optional[str] = None
    model: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    findings: List[Finding] = field(default_factory=list)

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def extend(self, other: "Report") -> None:
        self.findings.extend(other.findings)

    @property
    def errors(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def codes(self) -> List[str]:
        return [f.code for f in self.findings]

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "findings": [f.to_dict() for f in self.findings]},
                          indent=2)

    def to_text(self) -> str:
        if not self.findings:
            return "no findings"
        rows = [("code", "severity", "model", "target", "message", "fix")]
        rows += [(f.code, f.severity, f.model, f.target, f.message, f.fix) for f in self.findings]
        widths = [min(max(len(r[i]) for r in rows), 40) for i in range(4)]
        lines = []
        for r in rows:
            head = "  ".join(c.ljust(w) for c, w in zip(r[:4], widths))
            lines.append(f"{head}  {r[4]}" + (f"  -> {r[5]}" if r[5] and r is not rows[0] else ""))
        n_err, n_warn = len(self.errors), sum(f.severity == "warning" for f in self.findings)
        lines.append(f"{n_err} error(s), {n_warn} warning(s)")
        return "\n".join(lines)

    def to_github(self) -> str:
        """GitHub Actions workflow commands: one annotation per finding."""
        level = {"error": "error", "warning": "warning", "info": "notice"}
        return "\n".join(
            f"::{level[f.severity]} file={f.model},title={f.code} {f.name}::"
            f"{f.target}: {f.message}" + (f" Fix: {f.fix}" if f.fix else "")
            for f in self.findings)
