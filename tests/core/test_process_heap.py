"""return_freed_heap: freed C-heap blocks go back to the system (checked in a fresh process)."""

import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent(
    """
    from mistral_tune.core.process import return_freed_heap

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    blocks = [bytearray(100_000) for _ in range(8000)]  # 800 MB in blocks under glibc's mmap threshold
    blocks = blocks[::2]  # free every other block: the heap cannot shrink from its top
    before = rss_mib()
    released = return_freed_heap()
    after = rss_mib()
    print(released, round(before), round(after))
    """
)


def test_freed_heap_is_returned_to_the_system():
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True).stdout.split()
    released, before, after = out[0] == "True", float(out[1]), float(out[2])
    assert released
    assert before - after > 250, f"RSS {before} MiB -> {after} MiB: the ~400 MB of freed blocks stayed resident"
