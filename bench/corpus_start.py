"""Start-up of a foreign corpus on object storage: the time to count the samples of N small tars given as a brace URL
pattern (what a video2dataset user has), on a local S3 server.

    python -m bench.corpus_start [--shards 1000] [--samples 4] [--sample-bytes 2048] [--repeat 3] [--quick]

Starts moto's S3 server as its own process on 127.0.0.1 (loopback only), uploads N tars of `--samples` samples each
(`{key}.mp4` of --sample-bytes random bytes, `{key}.txt`, `{key}.json`), and times `resolved_corpus` on the pattern
`s3://bench/shard-{000000..N-1}.tar`, each time with a fresh s3fs instance (no listing or file cache carried over):

- sequential scan: each tar's member headers read one tar after the other, as before issue 18
  (`pipeline.data.stream._tar_samples` in a loop, the code path `resolved_corpus` had);
- parallel scan: `resolved_corpus` now, no stats files present (SCAN_THREADS tars at once);
- stats files: `resolved_corpus` now with video2dataset's `{shard}_stats.json` beside every tar (one listing and
  one concurrent fetch of the small JSON files; no tar is opened);
- resume: `resolved_corpus` with the counts a first start kept in the run folder (`corpus_counts.json`): no request.
Prints a markdown table: median seconds of --repeat runs and the HTTP requests of one (counted in the server's
request log). On loopback a request costs the server's CPU time, not a network round trip, so the seconds mostly
measure moto; the request counts, and which of them wait one after the other, carry over to real object storage.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

BUCKET = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tar_of(shard: int, samples: int, sample_bytes: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for j in range(samples):
            key = f"s{shard:06d}_{j:03d}"
            for ext, data in (("mp4", os.urandom(sample_bytes)), ("txt", b"a caption"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def start_server(port: int, log_file) -> subprocess.Popen:
    """Starts moto's S3 server; its request log (one line per HTTP request) goes to `log_file`."""
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log_file, stderr=log_file, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("moto server did not start")


def fresh_s3():
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    return fsspec.filesystem("s3", skip_instance_cache=True)


def requests_logged(log_path: str) -> int:
    time.sleep(0.2)  # the server's log lines of the last requests
    with open(log_path, errors="replace") as f:
        return sum("HTTP/1.1" in line for line in f)


def timed(fn, repeat: int, log_path: str) -> tuple[float, object, float]:
    """Returns (median seconds, the result, HTTP requests per run)."""
    times, result = [], None
    before = requests_logged(log_path)
    for _ in range(repeat):
        fresh_s3()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result, (requests_logged(log_path) - before) / repeat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=4, help="samples per tar")
    parser.add_argument("--sample-bytes", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="50 tars, one run each (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shards, args.repeat = 50, 1

    port = free_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    from pipeline.data import stream

    log_dir = tempfile.mkdtemp(prefix="bench_moto_")
    log_path = os.path.join(log_dir, "requests.log")
    log_file = open(log_path, "w")
    server = start_server(port, log_file)
    try:
        fs = fresh_s3()
        fs.mkdir(BUCKET)
        names = [f"{BUCKET}/shard-{i:06d}" for i in range(args.shards)]
        fs.pipe({f"{n}.tar": tar_of(i, args.samples, args.sample_bytes) for i, n in enumerate(names)})
        pattern = f"s3://{BUCKET}/shard-{{000000..{args.shards - 1:06d}}}.tar"
        urls = [f"s3://{n}.tar" for n in names]
        want = (args.samples,) * args.shards

        def sequential():
            return tuple(sum(1 for _ in stream._tar_samples(u, wanted=lambda i: False)) for u in urls)

        rows = []
        t, counts, n = timed(sequential, args.repeat, log_path)
        rows.append(("sequential scan (before)", t, n, counts == want))
        t, corpus, n = timed(lambda: stream.resolved_corpus(pattern), args.repeat, log_path)
        rows.append((f"parallel scan ({stream.SCAN_THREADS} threads)", t, n, corpus.counts == want))
        with tempfile.TemporaryDirectory(prefix="bench_corpus_") as run_dir:
            stream.keep_counts(run_dir, [corpus])
            resume = timed(lambda: stream.resolved_corpus(pattern, known=stream.known_counts(run_dir)),
                           args.repeat, log_path)
        stats = {f"{n}{stream.STATS_SUFFIX}": json.dumps({"count": args.samples, "successes": args.samples}).encode()
                 for n in names}
        fresh_s3().pipe(stats)
        t, from_stats, n = timed(lambda: stream.resolved_corpus(pattern), args.repeat, log_path)
        rows.append(("video2dataset stats files", t, n, from_stats.counts == want))
        rows.append(("resume (counts kept in the run folder)", resume[0], resume[2], resume[1].counts == want))
    finally:
        server.terminate()
        server.wait()
        log_file.close()
        shutil.rmtree(log_dir, ignore_errors=True)
    print(f"\n{args.shards} tars of {args.samples} samples ({args.sample_bytes} B media each) on a local moto S3 "
          f"server (own process, 127.0.0.1); median of {args.repeat}; {os.cpu_count()} CPUs on this machine.\n")
    print("| start-up | seconds | HTTP requests | counts right |")
    print("|---|---|---|---|")
    for name, seconds, requests, ok in rows:
        print(f"| {name} | {seconds:.2f} | {requests:.0f} | {ok} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
