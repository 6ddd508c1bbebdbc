"""bench.seek: the planned CPU decoding against decoding in order, and the frames DALI goes through in the whole and
the trimmed stream, on small clips (every code path, seconds)."""
import re

from bench.seek import main


def test_seek_bench_checks_the_frames_and_prints_a_row_per_clip(capsys):
    assert main(["--size", "64", "--clips", "40x250", "120x10", "--repeats", "1", "--content", "textured"]) == 0
    rows = re.findall(r"^\| (\d+) \| (\d+) \| \d+ \| \d+ \| [\d.]+x \| (\d+) \| (\d+) \|$", capsys.readouterr().out,
                      re.M)
    assert [(f, k) for f, k, _, _ in rows] == [("40", "250"), ("120", "10")]
    assert all(int(trimmed) < int(whole) for _, _, whole, trimmed in rows)
