#!/usr/bin/env python3
"""Top-1 per frame from ``edge-agent run`` logs, and the arm64 check's verdict.

    top1.py compare X86_LOG ARM64_LOG NAME     exit 0 when arm64 agrees with x86

The agent logs one line per classified frame (``edge_agent.results``):
``demo frame 12: mobilenet_v2 v2 15.2 ms: Egyptian cat 0.75, tabby 0.16, ...``
(up to 5 classes). Both runs read the same video with ``realtime = false``, so both
classify every frame and the frames line up one to one.

The int8 kernels of x86 (AVX2/AVX-512) and ARM (NEON) round differently, so
a frame on which the model hesitates between two classes (x86 itself flips
between neighbouring frames of the same photo there) may flip between the
machines too. Agreement means:

* every frame x86 classifies with confidence (top-1 score >= CONFIDENT)
  has the same top-1 on arm64;
* at least MIN_AGREEMENT of all frames have the same top-1.

(Measured: the frames that differ are the eagle photo's vulture/bald eagle,
the astronaut photo's — no ImageNet class, top-1 scores 0.07–0.17 — and
the water buffalo/warthog ones; x86 flips between those classes from frame
to frame as well.)

Standard library only: it runs with the system's python3.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LINE = re.compile(r"edge_agent\.results: \S+ frame (\d+): \S+ v\d+ ([\d.]+) ms: (.+)$")
CLASS = re.compile(r"(.+?) (\d\.\d+)(?:, |$)")
CONFIDENT = 0.5
MIN_AGREEMENT = 0.8


def top1(log: Path) -> dict[int, tuple[str, float, float, list[str]]]:
    """frame -> (top-1 label, its score, inference ms, the top-k labels)."""
    frames: dict[int, tuple[str, float, float, list[str]]] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = LINE.search(line)
        if m:
            classes = CLASS.findall(m.group(3))
            if classes:
                frames[int(m.group(1))] = (classes[0][0], float(classes[0][1]), float(m.group(2)), [c for c, _ in classes])
    return frames


def compare(x86_log: Path, arm_log: Path, runtime: str) -> int:
    x86, arm = top1(x86_log), top1(arm_log)
    if not x86 or not arm:
        print(f"{runtime}: no results in {x86_log if not x86 else arm_log}")
        return 1
    if sorted(x86) != sorted(arm):
        print(f"{runtime}: the frames differ: x86 {len(x86)} frames, arm64 {len(arm)} frames")
        return 1
    differ = [f for f in sorted(x86) if x86[f][0] != arm[f][0]]
    labels = []  # the top-1 runs of the video, e.g. "0-29 Egyptian cat"
    for f in sorted(x86):
        if labels and labels[-1][2] == x86[f][0] and labels[-1][1] == f - 1:
            labels[-1][1] = f
        else:
            labels.append([f, f, x86[f][0]])
    max_score_gap = max(abs(x86[f][1] - arm[f][1]) for f in x86)
    ms = sorted(v[2] for v in arm.values())
    print(f"{runtime}: {len(x86)} frames, top-1 agrees on {len(x86) - len(differ)}/{len(x86)}; "
          f"largest top-1 score difference {max_score_gap:.2f}; "
          f"median inference x86 {sorted(v[2] for v in x86.values())[len(x86) // 2]:.1f} ms, "
          f"arm64 emulated {ms[len(ms) // 2]:.1f} ms")
    print(f"{runtime}: top-1 along the video (x86 = arm64 unless listed below): "
          + "; ".join(f"{a}-{b} {label}" for a, b, label in labels))
    failed = []
    for f in differ:
        why = []
        if x86[f][1] >= CONFIDENT:
            why.append(f"x86 is confident (>= {CONFIDENT})")
        print(f"{runtime}: frame {f} differs: x86 {x86[f][0]} {x86[f][1]:.2f} (then {', '.join(x86[f][3][1:]) or '-'}); "
              f"arm64 {arm[f][0]} {arm[f][1]:.2f} (then {', '.join(arm[f][3][1:]) or '-'})"
              + (f": FAIL, {' and '.join(why)}" if why else ": a hesitant frame, allowed"))
        if why:
            failed.append(f)
    agreement = 1 - len(differ) / len(x86)
    if agreement < MIN_AGREEMENT:
        print(f"{runtime}: FAIL: top-1 agreement {agreement:.0%} < {MIN_AGREEMENT:.0%}")
        return 1
    if failed:
        print(f"{runtime}: FAIL on frames {failed}")
        return 1
    confident = sum(1 for f in x86 if x86[f][1] >= CONFIDENT)
    print(f"{runtime}: agrees: all {confident} frames where x86 is confident (>= {CONFIDENT}) identical, "
          f"{agreement:.0%} of all frames identical (at least {MIN_AGREEMENT:.0%} needed)")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[1] != "compare":
        print(__doc__.strip().splitlines()[2].strip())
        return 2
    return compare(Path(argv[2]), Path(argv[3]), argv[4])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
