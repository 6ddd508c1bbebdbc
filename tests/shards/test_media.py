"""Media reading (retries against a real flaky HTTP server), validation and processing with PyAV/PIL."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import threading

import av
import numpy as np
import pytest
from PIL import Image

from shards.media import MediaError, ProcessOptions, RetryPolicy, process_image, process_video, read_bytes, validate
from tests.shards.conftest import closed_port, write_jpg

FAST = RetryPolicy(attempts=3, backoff_s=0.01)


def decoded(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


class FlakyServer:
    """A local HTTP server that answers 503 to the first `fail` requests of each path, then serves `body`."""

    def __init__(self, body: bytes, fail: int):
        seen: dict[str, int] = {}
        self.requests = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                seen[self.path] = seen.get(self.path, 0) + 1
                if seen[self.path] <= fail:
                    self.send_error(503, "busy")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_transient_errors_are_retried_with_backoff():
    waits = []
    with FlakyServer(b"payload", fail=2) as base:
        assert read_bytes(f"{base}/clip.mp4", RetryPolicy(attempts=4, backoff_s=0.01), sleep=waits.append) == b"payload"
    assert waits == [0.01, 0.02]


def test_retries_run_out_and_count_as_unreachable():
    waits = []
    with FlakyServer(b"payload", fail=10) as base:
        with pytest.raises(MediaError) as e:
            read_bytes(f"{base}/clip.mp4", FAST, sleep=waits.append)
    assert e.value.reason == "unreachable" and "after 3 tries" in e.value.detail and len(waits) == 2
    with pytest.raises(MediaError) as e:
        read_bytes(f"http://127.0.0.1:{closed_port()}/x.mp4", FAST, sleep=lambda s: None)
    assert e.value.reason == "unreachable"


def test_missing_and_unreadable_files_fail_at_once(tmp_path):
    waits = []
    with pytest.raises(MediaError) as e:
        read_bytes(str(tmp_path / "nope.mp4"), FAST, sleep=waits.append)
    assert e.value.reason == "missing_file" and "nope.mp4" in e.value.detail and waits == []
    with pytest.raises(MediaError) as e:
        read_bytes(str(tmp_path), FAST, sleep=waits.append)
    assert e.value.reason == "unreadable" and waits == []


def test_validate_video_image_and_bad_bytes(tmp_path, make_mp4):
    data = make_mp4(tmp_path / "a.mp4", frames=8, size=(48, 32)).read_bytes()
    info = validate(data, "video", "mp4")
    assert (info.kind, info.ext, info.width, info.height, info.codec) == ("video", "mp4", 48, 32, "h264")
    assert info.fps == pytest.approx(8) and info.duration == pytest.approx(1.0, abs=0.15)
    assert validate(data, None, "").ext == "mp4"  # no extension: sniffed
    jpg = write_jpg(tmp_path / "a.jpg", "red").read_bytes()
    assert validate(jpg, "image", "jpg").ext == "jpg" and validate(jpg, None, "").kind == "image"
    for bad, kind, reason in [(b"", "video", "empty_file"), (data[: len(data) // 3], "video", "corrupt_video"),
                              (b"not a video at all" * 10, "video", "corrupt_video"),
                              (jpg[: len(jpg) // 2], "image", "corrupt_image")]:
        with pytest.raises(MediaError) as e:
            validate(bad, kind, "")
        assert e.value.reason == reason


def test_process_video_cuts_resizes_and_resamples(tmp_path, make_mp4):
    from tests.conftest import mp4_frame_level

    data = make_mp4(tmp_path / "a.mp4", frames=16, size=(48, 32), fps=8).read_bytes()
    opts = ProcessOptions(clip=True, short_side=16, fps=4)
    out, done = process_video(data, opts, start=0.5, end=1.5)
    frames = decoded(out)
    assert len(frames) == 4 and frames[0].shape == (16, 24, 3)
    assert done == {"start": 0.5, "end": 1.5, "fps": 4, "frames": 4}
    assert process_video(data, opts, start=0.5, end=1.5)[0] == out  # reproducible bytes (resumed runs rely on it)
    # source frame k shows grey level mp4_frame_level(k, 16); output frame j is source frame 4 + 2j (0.5 s + j/4 s)
    levels = [int(np.median(f[:2, :, :])) for f in frames]
    assert levels == pytest.approx([mp4_frame_level(4 + 2 * j, 16) for j in range(4)], abs=6)


def test_process_video_max_duration_keeps_rate(tmp_path, make_mp4):
    data = make_mp4(tmp_path / "a.mp4", frames=16, size=32, fps=8).read_bytes()
    out, done = process_video(data, ProcessOptions(max_duration=0.5), start=1.0, end=None)  # clip off: start ignored
    assert len(decoded(out)) == 4 and done["start"] == 0.0 and done["fps"] == 8


def key_frames(data: bytes) -> list[int]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        packets = sorted((p for p in container.demux(stream) if p.size), key=lambda p: p.pts)
    return [i for i, p in enumerate(packets) if p.is_keyframe]


def test_process_video_keyint_puts_a_key_frame_every_n_frames_and_changes_the_fingerprint(tmp_path, make_mp4):
    """--keyint: the re-encoded clip has a key frame at least every N frames (the loader's decoder restarts there);
    the option enters the shards' fingerprint when set, and only then."""
    from shards.index import LAYOUT_VERSION, fingerprint
    from shards.manifest import ManifestRow

    data = make_mp4(tmp_path / "a.mp4", frames=40, size=32, fps=8).read_bytes()
    plain, _ = process_video(data, ProcessOptions(short_side=32), start=None, end=None)
    out, done = process_video(data, ProcessOptions(keyint=6), start=None, end=None)
    assert done["frames"] == 40 and len(decoded(out)) == 40
    keys = key_frames(out)
    assert keys[0] == 0 and max(b - a for a, b in zip(keys, keys[1:] + [40])) <= 6
    assert len(key_frames(plain)) < len(keys)
    rows = [ManifestRow(row=0, key="a", media="a.mp4", captions=("a",))]
    assert fingerprint(rows, ProcessOptions(keyint=6)) != fingerprint(rows, ProcessOptions())
    # without it, the digest of the options the layout's first release had: a job begun then resumes, not rewrites
    first_release = {"clip": False, "max_duration": None, "short_side": None, "fps": None, "codec": "libx264",
                     "crf": 23, "jpeg_quality": 90}
    payload = json.dumps({"layout": LAYOUT_VERSION, "process": first_release, "rows": [dataclasses.asdict(rows[0])]},
                         sort_keys=True, default=str)
    assert fingerprint(rows, ProcessOptions()) == hashlib.sha256(payload.encode()).hexdigest()


def test_process_video_of_an_empty_range_fails(tmp_path, make_mp4):
    data = make_mp4(tmp_path / "a.mp4", frames=8, size=32).read_bytes()
    with pytest.raises(MediaError) as e:
        process_video(data, ProcessOptions(clip=True), start=5.0, end=6.0)
    assert e.value.reason == "processing_failed"


def test_process_image_short_side(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (60, 40), "blue").save(png, format="PNG")
    out, done = process_image(png.getvalue(), ProcessOptions(short_side=20))
    with Image.open(io.BytesIO(out)) as im:
        assert (im.format, im.size) == ("JPEG", (30, 20)) and done == {"width": 30, "height": 20}
