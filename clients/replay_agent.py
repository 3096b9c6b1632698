"""One replayed agent: a small process that follows its trace's memory between tool calls.

``python -m agentcg.clients.replay_agent PLAN.json`` holds memory (1 MiB blocks, every page
touched) at the plan's levels; each tool call is run by the driver (``agentcg.clients.replay``)
as a separate process while this one keeps its level, and time moves on only once the call is
done: a delayed call shifts the rest of the trace. Standard library only, so the interpreter's
own memory stays small; that memory is held back from every level.

Line protocol, this process -> driver (stdout) / driver -> this process (stdin):
  GROW <bytes>    -> OK <leased bytes>   (lease mode: before rising above what is leased)
  SHRINK <bytes>  -> OK <leased bytes>   (lease mode: well below what is leased)
  READY           -> GO                  (interpreter up; all agents are let go together)
  START                                   (first level in place: the trace's clock starts)
  CALL <index>    -> DONE <index>
  END                                     (the trace is over; then exit 0)
"""

from __future__ import annotations

import json
import sys
import time

BLOCK = 1 << 20
SHRINK_SLACK = 8 << 20  # give leased memory back once this much is unused


def _own_rss() -> int:
    # Anonymous pages only: the interpreter's file pages are page cache charged once, to whoever
    # read them first, not to each process.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Agent:
    def __init__(self, lease: bool, chunk: int) -> None:
        self.blocks: list[bytearray] = []
        self.own = _own_rss()
        self.lease = lease
        self.chunk = chunk
        self.leased = 0

    def ask(self, line: str) -> str:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        reply = sys.stdin.readline()
        if not reply:
            sys.exit(3)  # the driver went away
        return reply.strip()

    def level(self, level_bytes: int) -> None:
        if self.lease:
            if level_bytes > self.leased:
                want = -(-level_bytes // self.chunk) * self.chunk
                self.leased = int(self.ask(f"GROW {want}").split()[1])
            elif self.leased - level_bytes > SHRINK_SLACK:
                self.leased = int(self.ask(f"SHRINK {level_bytes}").split()[1])
        want_blocks = max(0, level_bytes - self.own) // BLOCK
        while len(self.blocks) < want_blocks:
            self.blocks.append(bytearray(BLOCK))
        del self.blocks[want_blocks:]


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        plan = json.load(f)
    steps = plan["steps"]
    agent = Agent(bool(plan["lease"]), int(plan["chunk"]))
    if agent.ask("READY") != "GO":
        return 3
    # The first level may wait for its session reservation: the agent starts once it is in.
    first = steps[0]
    agent.level(int(first[2] if first[0] == "hold" else first[4]))
    sys.stdout.write("START\n")
    sys.stdout.flush()
    t0 = time.monotonic()
    shift = 0.0
    for step in steps:
        kind = step[0]
        at = step[3] if kind == "call" else step[1]
        due = t0 + shift + float(step[2] if kind == "call" else step[1])
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if kind == "hold":
            agent.level(int(step[2]))
        elif kind == "call":
            agent.level(int(step[4]))
            agent.ask(f"CALL {step[1]}")
        else:
            break
        # Anything that ran late (a delayed call, a lease wait) shifts the rest of the trace.
        shift = max(shift, time.monotonic() - t0 - float(at))
    sys.stdout.write("END\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
