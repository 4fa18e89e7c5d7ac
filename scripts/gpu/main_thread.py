#!/usr/bin/env python3
"""Where a command's main thread spends its time, without a profiler: runs the
command and samples /proc/PID/task/PID every millisecond (its state and, when
it sleeps, the kernel function it waits in), and reads its CPU time at the
end. A GPU pipeline whose main thread is running nearly all the time is
bound by the host's cost of issuing work (per-op overhead, launches); one
that mostly sleeps waits on the device or on another thread.

    scripts/gpu/main_thread.py -- sac compress doc.txt ...
"""

import collections
import os
import subprocess
import sys
import time


def main() -> None:
    cmd = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    task = f"/proc/{proc.pid}/task/{proc.pid}"
    states, waits = collections.Counter(), collections.Counter()
    cpu_s, started = 0.0, time.perf_counter()
    tick = os.sysconf("SC_CLK_TCK")
    while proc.poll() is None:
        try:
            with open(f"{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"{task}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            break
        state = fields[0]
        states[state] += 1
        if state != "R":
            waits[wchan or "?"] += 1
        cpu_s = (int(fields[11]) + int(fields[12])) / tick
        time.sleep(0.001)
    wall = time.perf_counter() - started
    err = proc.communicate()[1]
    samples = sum(states.values()) or 1
    print(err.strip().splitlines()[-1] if err.strip() else "(no output)")
    print(f"main thread: {cpu_s:.2f} s of CPU in {wall:.2f} s; "
          f"{100 * states['R'] / samples:.0f}% of {samples} samples running")
    for wchan, n in waits.most_common(5):
        print(f"  waiting in {wchan}: {100 * n / samples:.0f}%")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
