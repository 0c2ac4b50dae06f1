"""bench/gpu.py runs end to end (small sizes, on whatever device this machine has)."""

import importlib.util
from pathlib import Path

import pytest

GPU_BENCH = Path(__file__).parents[2] / "bench" / "gpu.py"


@pytest.fixture
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", GPU_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quick_gpu_benchmark_writes_every_sections_table(gpu_bench, tmp_path, capsys):
    assert gpu_bench.main([str(tmp_path), "--quick"]) == 0
    printed = capsys.readouterr().out
    for section in ("mask", "op", "decode", "saq", "e2e"):
        text = (tmp_path / f"{section}.txt").read_text()
        assert "failed" not in text and "----" in text
        assert text.splitlines()[2] in printed
    # The kernels change no greedy token of the tiny VLM, and SAQ holds fewer bytes.
    assert "no" not in (tmp_path / "e2e.txt").read_text().split("same tokens as sdpa")[1]
    saq_rows = (tmp_path / "saq.txt").read_text().splitlines()
    in_place = next(row for row in saq_rows if "in place" in row).split()
    assert float(in_place[4]) < 0.3  # x dyn: bytes held against a DynamicCache layer
