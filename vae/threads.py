"""How many CPU threads torch uses: chosen by timing the work itself.

torch runs one thread per core by default. On cores that other processes keep busy, threads wait for each other at
every operation, and one thread can be several times faster than two. So a run times a few steps at each candidate
count and keeps the fastest, unless --threads fixes it.
"""

import os
import time

import torch


def available_cores():
    """CPU cores this process may run on (the affinity mask, which containers narrow; else os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def candidate_counts(cores=None):
    """1, then doublings up to the cores, and the cores themselves: (1,) on one core, (1, 2) on two."""
    cores = cores or available_cores()
    counts = [1]
    while counts[-1] * 2 < cores:
        counts.append(counts[-1] * 2)
    if cores > 1:
        counts.append(cores)
    return tuple(counts)


def time_per_call(work, repeats):
    """Median seconds of `repeats` calls of work() after one call to warm up."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def choose_threads(work, requested=0, repeats=3, counts=None):
    """Set torch's thread count and return (count, {count: seconds per call} measured, empty when requested).

    requested > 0 is used as it is (--threads). Otherwise work() is timed at each of `counts` (candidate_counts())
    and the fastest count is kept; a tie goes to fewer threads, which leave cores to the rest of the machine.
    """
    if requested > 0:
        torch.set_num_threads(requested)
        return requested, {}
    timings = {}
    for count in counts or candidate_counts():
        torch.set_num_threads(count)
        timings[count] = time_per_call(work, repeats)
    best = min(timings, key=lambda count: (timings[count] * 1.05 if count > 1 else timings[count], count))
    torch.set_num_threads(best)
    return best, timings


def describe(count, timings, unit_count=1, unit="images"):
    """One line: the thread count and why, e.g. "threads: 1 (timed: 1 -> 410 images/s, 2 -> 180 images/s)"."""
    if not timings:
        return f"threads: {count} (--threads)"
    rates = ", ".join(f"{n} -> {unit_count / seconds:.0f} {unit}/s" for n, seconds in timings.items())
    return f"threads: {count} (timed: {rates}; --threads N fixes it)"
