"""bench.seek: the restarting CPU decoder against decoding in order, on small clips (every code path, seconds)."""
import re

from bench.seek import main


def test_seek_bench_checks_the_frames_and_prints_a_row_per_clip(capsys):
    assert main(["--size", "64", "--clips", "40x250", "120x10", "--repeats", "1"]) == 0
    rows = re.findall(r"^\| (\d+) \| (\d+) \| \d+ \| \d+ \| ([\d.]+)x \|$", capsys.readouterr().out, re.M)
    assert [(f, k) for f, k, _ in rows] == [("40", "250"), ("120", "10")]
