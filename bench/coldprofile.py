"""Where a mailqd worker's CPU goes per message: py-spy on each worker, stacks put in buckets.

Shared by bench/bench_coldstart.py (`--profile`; run as `python bench/NAME.py`,
so this folder is on sys.path). Each worker gets its own `py-spy record
--format raw --nonblocking` as soon as it is forked; after the run the raw
stacks (root first, one "function (file:line)" frame each) are read back,
and every sample is put in one bucket by its innermost mailqd frame that a
rule below names, walking from the leaf towards the root. Frames outside
mailqd (SQLAlchemy, psycopg, aiosmtplib, the email library, asyncio) take
the bucket of the mailqd code that called them; a sample with no such frame
is the event loop's or the interpreter's. The shares, times the workers'
CPU seconds from /proc, give µs per message.

The rules go by module path and function name, so they hold while the code
moves between modules: any function of `mailqd/store/` with "claim" in its
name is the claim, any with "complet" (or the outcome rows) is the outcome.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BUCKETS = (
    "claim (store claim + row handling)",
    "compose (templates, sanitize, DKIM)",
    "SMTP dialogue (transport)",
    "outcome recording (completer, store complete)",
    "other: worker start-up (imports, schema check)",
    "other: mailqd bookkeeping (delivery, worker, leases)",
    "other: event loop / interpreter (no mailqd frame)",
)
CLAIM, COMPOSE, SMTP, OUTCOME, STARTUP, DAEMON, LOOP = BUCKETS

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

# (bucket, file pattern, function pattern); the first that matches a frame decides.
_RULES: tuple[tuple[str, re.Pattern[str], re.Pattern[str]], ...] = tuple(
    (bucket, re.compile(file), re.compile(function))
    for bucket, file, function in (
        (CLAIM, r"mailqd/store/", r"claim|_job_from_row|screen"),
        (OUTCOME, r"mailqd/store/", r"complet|_job_outcome|_attempt_|_storable_text"),
        (OUTCOME, r"mailqd/daemon/completer", r""),
        (CLAIM, r"mailqd/daemon/worker", r"\._(claim|produce|set_aside|start)$"),
        (COMPOSE, r"mailqd/(compose|templating|signing)", r""),
        (COMPOSE, r"mailqd/daemon/(templates|delivery)", r"^_compose$|^_content$|render"),
        (SMTP, r"mailqd/transport/", r""),
        (STARTUP, r"mailqd/store/(migrat|engine)", r""),
        (STARTUP, r"mailqd/daemon/worker", r"_check_schema|transport_factory|_loop_factory|rules"),
        # Frames every stack has near its root: by themselves, the event loop's.
        (LOOP, r"mailqd/(cli/|__main__)", r""),
        (LOOP, r"mailqd/daemon/(worker|supervisor)", r"^(run_worker|_serve|run|main|<module>)$"),
        (DAEMON, r"mailqd/daemon/", r""),
    )
)
# mailqd modules that only serve their caller (logging, metrics, models): look past them.
_PASS_THROUGH = re.compile(r"mailqd/(logging|metrics|models|errors|ids|validation)")
# A leaf frame that is a thread waiting (py-spy --nonblocking may report it as running).
WAITING = "(waiting: dropped)"
_WAITING = re.compile(
    r"^(_worker \(concurrent/futures/thread\.py|(Condition|Event)\.wait \(threading\.py"
    r"|.*\(selectors\.py|.*\(queue\.py)"
)


def bucket_of(stack: list[str]) -> tuple[str, str]:
    """The bucket of one sample (frames root first), and the frame that decided it.

    A store frame no rule names (a connection checkout, a lease extension)
    takes its caller's bucket; with no caller that a rule names, it is
    bookkeeping.
    """
    if stack and _WAITING.match(stack[-1]):
        return WAITING, stack[-1]
    unnamed_store: str | None = None
    for frame in reversed(stack):
        match = _FRAME.match(frame)
        if match is None:
            continue
        if "importlib._bootstrap" in match["file"]:
            return STARTUP, frame
        if "mailqd/" not in match["file"] or _PASS_THROUGH.search(match["file"]):
            continue
        name = f"{match['file']}:{match['function']}"
        for bucket, file, function in _RULES:
            if file.search(match["file"]) and function.search(match["function"]):
                if bucket == LOOP and unnamed_store is not None:
                    return DAEMON, unnamed_store
                return bucket, name
        if "mailqd/store/" in match["file"]:
            unnamed_store = unnamed_store or name
            continue
        return DAEMON, name
    if unnamed_store is not None:
        return DAEMON, unnamed_store
    return LOOP, (stack[-1] if stack else "(empty)")


@dataclass
class Split:
    """Samples per bucket, and which frames decided them."""

    samples: Counter[str] = field(default_factory=Counter)
    deciders: dict[str, Counter[str]] = field(default_factory=dict)

    def add_raw(self, text: str) -> None:
        for line in text.splitlines():
            stack_text, _, count = line.rpartition(" ")
            if not stack_text or not count.isdigit():
                continue
            bucket, decider = bucket_of(stack_text.split(";"))
            self.samples[bucket] += int(count)
            self.deciders.setdefault(bucket, Counter())[decider] += int(count)

    def merge(self, other: Split) -> None:
        self.samples.update(other.samples)
        for bucket, counter in other.deciders.items():
            self.deciders.setdefault(bucket, Counter()).update(counter)

    @property
    def total(self) -> int:
        return sum(n for bucket, n in self.samples.items() if bucket != WAITING)

    def print(self, worker_cpu_seconds: float, messages: int, top: int = 3) -> None:
        total = self.total
        if not total:
            print("    no samples (did py-spy attach? it needs ptrace: root or CAP_SYS_PTRACE)")
            return
        per_message = worker_cpu_seconds / messages * 1e6
        print(
            f"    {total:,} samples ({self.samples[WAITING]:,} of waiting threads dropped);"
            f" worker CPU {worker_cpu_seconds:.2f} s = {per_message:,.0f} us/msg,"
            " split by the samples' shares:"
        )
        for bucket in BUCKETS:
            share = self.samples[bucket] / total
            print(f"      {bucket:<52} {share * per_message:>6,.0f} us/msg  {share:6.1%}")
            for decider, count in self.deciders.get(bucket, Counter()).most_common(top):
                print(f"          {count / total:6.1%}  {decider[:110]}")
        other = sum(self.samples[b] for b in (STARTUP, DAEMON, LOOP)) / total
        print(f"      {'other, all three':<52} {other * per_message:>6,.0f} us/msg  {other:6.1%}")


class Profiler:
    """py-spy on every worker of a system as it appears, until `stop`."""

    def __init__(self, pyspy: str, workdir: Path, rate: int) -> None:
        self.pyspy, self.workdir, self.rate = pyspy, workdir, rate
        self._spies: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker_pids: Callable[[], list[int]]) -> None:
        """Attach to each pid `worker_pids` names, polling every 5 ms (workers are forked late)."""
        self._done.clear()
        self._spies = {}
        self._thread = threading.Thread(target=self._follow, args=(worker_pids,), daemon=True)
        self._thread.start()

    def _follow(self, worker_pids: Callable[[], list[int]]) -> None:
        while not self._done.wait(0.005):
            for pid in worker_pids():
                if pid not in self._spies:
                    self._spies[pid] = self._attach(pid)

    def _attach(self, pid: int) -> tuple[subprocess.Popen[bytes], Path]:
        out = self.workdir / f"py-spy-{pid}.txt"
        argv = [
            self.pyspy, "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
            "--rate", str(self.rate), "--output", str(out),
        ]  # fmt: skip
        log = (self.workdir / f"py-spy-{pid}.log").open("wb")
        with log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return proc, out

    def stop(self) -> Split:
        """Stop every py-spy (SIGINT: it writes its file) and read their samples."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        split = Split()
        for proc, out in self._spies.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError):
                split.add_raw(out.read_text(errors="replace"))
        return split

    @property
    def attached(self) -> int:
        return len(self._spies)
