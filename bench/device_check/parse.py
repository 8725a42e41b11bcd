"""Reading what the device check's steps wrote: pytest's junit XML, pytest-benchmark's JSON, the
K3 check's and kgraph's log lines, ``steps.txt``, the update's JSON and the trainer's metrics.

Every reader takes a path, returns plain data and never raises on a missing or cut file (a step
interrupted at its time limit leaves partial output): it returns what it could read, and the
readers that can fail say why in their result.
"""
from __future__ import annotations

import glob
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class TestCounts:
    """pytest's junit XML: totals and the failures, errors and skips (``problem``: why unreadable)."""

    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    failed: List[str] = field(default_factory=list)
    skips: List[str] = field(default_factory=list)
    problem: Optional[str] = None

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def junit(path: str) -> TestCounts:
    if not os.path.exists(path):
        return TestCounts(problem="no junit file (step skipped, killed at its limit, or pytest did not start)")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        return TestCounts(problem=f"unreadable junit file: {exc}")
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = TestCounts(**{k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")})
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            bad = case.find(tag)
            if bad is not None:
                msg = (bad.get("message") or "").splitlines()
                c.failed.append(f"{tag.upper()} {case.get('classname')}::{case.get('name')}: "
                                f"{msg[0][:160] if msg else ''}")
        skip = case.find("skipped")
        if skip is not None:
            c.skips.append(f"{case.get('name')}: {(skip.get('message') or '')[:100]}")
    return c


def collected(log: str) -> Optional[int]:
    """How many tests pytest collected (its ``collected N items`` line in ``log``), if it says."""
    found = None
    for line in _lines(log):
        m = re.search(r"collected (\d+) items?", line)
        if m:
            found = int(m.group(1))
    return found


def benchmarks(work: str) -> tuple:
    """(benchmarks, machine_info, problems) of every ``bench_*.json`` in ``work``; each benchmark
    gets ``part`` (the file's step)."""
    out, machine, problems = [], None, []
    for path in sorted(glob.glob(os.path.join(work, "bench_*.json"))):
        if os.path.getsize(path) == 0:        # pytest-benchmark leaves it empty when nothing ran
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            problems.append(f"{os.path.basename(path)}: unreadable ({exc})")
            continue
        machine = machine or data.get("machine_info")
        for b in data.get("benchmarks", []):
            b["part"] = os.path.basename(path)[len("bench_"):-len(".json")]
            out.append(b)
    return out, machine, problems


def key_values(path: str, prefix: str) -> Dict[str, Dict[str, str]]:
    """``PREFIX name k=v k=v`` lines (kgraph's ``KGRAPH``) -> {name: {k: v}}."""
    out: Dict[str, Dict[str, str]] = {}
    for line in _lines(path):
        parts = line.split()
        if len(parts) >= 3 and parts[0] == prefix and "=" in parts[2]:
            out[parts[1]] = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
    return out


def check_lines(path: str) -> List[str]:
    """The K3 check's verdict lines (PASS / FAIL / NOTE, its total, errors)."""
    return [line for line in _lines(path)
            if line.startswith(("PASS", "FAIL", "NOTE", "k3check", "    all")) or "Error" in line]


@dataclass
class StepRecord:
    """One line of ``steps.txt``: name, exit code (None: not run), seconds, limit, why not run."""

    name: str
    rc: Optional[int]
    seconds: float
    limit: int
    note: str = ""

    @property
    def timed_out(self) -> bool:
        return self.rc in (124, 137)


def steps(path: str) -> List[StepRecord]:
    out = []
    for line in _lines(path):
        parts = line.split(maxsplit=4)
        if len(parts) < 4:
            continue
        name, rc, secs, lim = parts[:4]
        try:
            out.append(StepRecord(name, None if rc == "-" else int(rc), float(secs), int(lim),
                                  parts[4] if len(parts) > 4 else ""))
        except ValueError:
            continue
    return out


def write_step(path: str, rec: StepRecord) -> None:
    rc = "-" if rec.rc is None else str(rec.rc)
    with open(path, "a") as f:
        f.write(f"{rec.name} {rc} {rec.seconds:.1f} {rec.limit}" + (f" {rec.note}" if rec.note else "") + "\n")


def json_file(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def jsonl(path: str) -> List[dict]:
    """JSON lines; a line cut by a step's time limit is skipped."""
    out = []
    for line in _lines(path):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def env_facts(path: str) -> List[str]:
    """The first ``device`` / ``torch`` / ``triton`` / ``python`` lines of env.txt (not pip's list)."""
    first: Dict[str, str] = {}
    for line in _lines(path):
        for p in ("device ", "torch ", "triton ", "python "):
            if line.startswith(p) and "  " not in line:
                first.setdefault(p, line)
    return list(first.values())


def _lines(path: str) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []
