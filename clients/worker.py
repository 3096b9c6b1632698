"""A process that follows a memory curve: allocates and touches memory to rise, frees to fall.

``python -m agentcg.clients.worker --curve 0:10,0.5:150,1.2:20 --scale 1.0`` holds 10 MB, then
150 MB from t=0.5 s, then 20 MB from t=1.2 s, and exits at the last point. Memory is held in
1 MiB blocks (mmap-backed, so a free returns pages to the kernel at once).
"""

from __future__ import annotations

import argparse
import sys
import time

BLOCK = 1 << 20


def parse_curve(text: str) -> list[tuple[float, float]]:
    points = []
    for part in text.split(","):
        t, mb = part.split(":")
        points.append((float(t), float(mb)))
    if not points or any(b[0] < a[0] for a, b in zip(points, points[1:], strict=False)):
        raise ValueError("curve: need time-ordered t:mb points")
    return points


def own_rss_bytes() -> int:
    """This process's own anonymous memory (RssAnon from /proc/self/status)."""
    # Anonymous pages only: the interpreter's file pages are page cache charged once, to whoever
    # read them first, not to each process.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def follow(points: list[tuple[float, float]], scale: float = 1.0, minus_bytes: int = 0) -> int:
    """Follow the curve; ``minus_bytes`` (e.g. the interpreter's own RSS) is held back from
    every point, so the process as a whole, not just its blocks, follows the curve."""
    blocks: list[bytearray] = []
    start = time.monotonic()
    peak = 0
    for t, mb in points:
        delay = start + t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        want = max(0, int(mb * scale * 1_000_000) - minus_bytes) // BLOCK
        while len(blocks) < want:
            blocks.append(bytearray(BLOCK))  # zero-filled: every page touched
        del blocks[want:]
        peak = max(peak, len(blocks))
    return peak * BLOCK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--curve", required=True)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument(
        "--minus-own-rss",
        action="store_true",
        help="hold back this interpreter's own memory so the whole process follows the curve",
    )
    args = p.parse_args(argv)
    follow(parse_curve(args.curve), args.scale, own_rss_bytes() if args.minus_own_rss else 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
