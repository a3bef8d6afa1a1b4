"""Paging out memory-mapped weights: resident memory goes down, the data stays."""
import mmap
import re
import sys
import threading
import time

import numpy as np
import pytest

from sam_onnx.exporter import paging

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux madvise")


def _rss_file_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"RssFile:\s+(\d+)", f.read()).group(1)) / 1024


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).standard_normal(16 * 2**20, dtype=np.float32)
    data.tofile(path)  # 64 MiB
    return path, float(data.sum(dtype=np.float64))


def test_paging_out_a_mapped_file_frees_its_pages_and_keeps_its_data(weights_file):
    path, total = weights_file
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    array = np.frombuffer(mapped, dtype=np.float32)
    assert array.sum(dtype=np.float64) == total  # every page now resident
    resident = _rss_file_mib()
    assert paging.page_out(path) >= path.stat().st_size
    assert _rss_file_mib() < resident - 48
    assert array.sum(dtype=np.float64) == total  # read back from the file
    del array
    mapped.close()


def test_a_file_this_process_does_not_map_is_left_alone(weights_file):
    path, _ = weights_file
    assert paging.mapped_ranges(path) == []
    assert paging.page_out(path) == 0


def test_paged_out_keeps_paging_while_the_block_runs(weights_file):
    path, total = weights_file
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    array = np.frombuffer(mapped, dtype=np.float32)
    before = _rss_file_mib()
    with paging.paged_out(path, interval_s=0.01):
        assert "sam-onnx-page-out" in [t.name for t in threading.enumerate()]
        assert array.sum(dtype=np.float64) == total  # touches all 64 MiB
        deadline = time.time() + 5
        while _rss_file_mib() > before + 16:
            assert time.time() < deadline, "the pages were never paged out"
            time.sleep(0.01)
    assert "sam-onnx-page-out" not in [t.name for t in threading.enumerate()]
    assert array.sum(dtype=np.float64) == total
    del array
    mapped.close()
