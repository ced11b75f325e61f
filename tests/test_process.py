"""Process-wide runtime knobs of a model worker (cosyvoice_lite.memory)."""
import subprocess
import sys
import textwrap

from conftest import ROOT


def test_a_thread_that_releases_its_compute_threads_leaves_no_openmp_threads_behind():
    # a fresh interpreter: the test process's own threads must not count
    script = textwrap.dedent("""
        import os, threading, time, torch
        from cosyvoice_lite.memory import release_compute_threads
        torch.set_num_threads(2)
        count = lambda: len(os.listdir("/proc/self/task"))
        before = count()
        x = torch.randn(1024, 1024)
        x @ x  # a parallel op: OpenMP starts this thread's workers
        with_pool = count()
        release_compute_threads()
        deadline = time.monotonic() + 5  # the workers are told to stop; each leaves /proc when it has exited
        while count() > before and time.monotonic() < deadline:
            time.sleep(0.01)
        print(before, with_pool, count())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, with_pool, after = map(int, out.stdout.split())
    assert with_pool > before  # the premise: torch ran this op on more than one thread
    assert after == before


def test_reserved_room_costs_memory_only_where_it_is_written_and_discarded_pages_are_given_back():
    script = textwrap.dedent("""
        import torch
        from cosyvoice_lite.memory import discard, lazy_empty, map_large_blocks
        map_large_blocks()
        def resident_mb():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024
        before = resident_mb()
        room = lazy_empty((16, 1024, 1024), torch.float32)  # 64 MB
        reserved = resident_mb()
        room[:4].fill_(1.0)  # a quarter written
        written = resident_mb()
        discard(room[:4])
        print(reserved - before, written - before, resident_mb() - before, float(room[1:3].abs().sum()))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reserved, written, discarded, values = map(float, out.stdout.split())
    assert reserved < 2
    assert 15 < written < 18
    assert discarded < 2
    assert values == 0.0  # discarded pages read as zeros (a page only partly inside the tensor is kept)
