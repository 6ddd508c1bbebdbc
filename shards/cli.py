"""Shard a video/image-text corpus into WebDataset tars, in parallel as Ray tasks.

INPUT is a manifest (CSV, TSV, JSONL, JSON list or Parquet; .gz etc. are read too) with a media column (path, video,
videoLoc, url, image or filepath; or --media-column) and one or more caption columns (caption, captions, text or
name; or --caption-column), optionally start/end times, a key column and any other metadata; or a folder of media
files with sidecar captions (clip.mp4 + clip.txt with one caption per line, optionally clip.json with metadata).
Any fsspec URL works for the manifest, the media and the output (local paths, file://, memory://, s3://, gs://, ...);
media paths that are not URLs are resolved against the manifest's folder.

Each sample is stored as video2dataset does: {key}.mp4 (or the source's container, or .jpg/.png for images),
{key}.txt (the first caption) and {key}.json (all captions under "captions", the row's other columns, and what the
validation found under "media_info"). Rows are cut into shards of --samples-per-shard by row order:
OUT/{prefix}-000000.tar holds rows [0, N), and so on. Beside the shards:
  OUT/index.json      per shard: url, samples, bytes, sha256, rows [first, last_exclusive]; "media"; totals
  OUT/failures.jsonl  one line per row that could not be sharded: row, key, media, shard, reason, detail
  OUT/summary.json    totals, failures by reason, throughput, nodes used

Bad input never stops the job: a missing, unreadable, empty or corrupt file (PyAV must decode a frame, PIL must load
an image), an empty caption or an unreachable URL is recorded in failures.jsonl and the rest goes on (exit 0).
Reads and writes are retried with exponential backoff (--retries, --retry-backoff) before a failure counts.
By default the original media bytes are stored; --clip, --max-duration, --short-side, --fps and --keyint re-encode
videos (H.264 mp4, PyAV) and --short-side also resizes images (jpg).

Every shard is written under a temporary name and appears under its final name only when complete; a run that is
stopped and started again with the same command skips the complete shards and ends with the same shards and index
as an uninterrupted run.

Ray: without --ray-address a local cluster with --workers CPUs is started for the job and stopped afterwards;
--ray-address auto (or HOST:PORT) joins a running cluster, whose nodes must have this package installed.

Exit status: 0 when every shard was written (skipped bad rows included), 1 when a shard could not be written (rerun to
retry it), 2 for a bad command line (missing manifest, no media column, ...).
"""
from __future__ import annotations

import argparse
import sys

from shards.index import format_summary
from shards.media import ProcessOptions, RetryPolicy
from shards.runner import ShardJobConfig, shard_corpus


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="MANIFEST",
                        help="manifest file (csv/tsv/jsonl/json/parquet) or folder of media, any fsspec URL")
    parser.add_argument("--out", required=True, metavar="URL", help="output folder for the shards, any fsspec URL")
    parser.add_argument("--samples-per-shard", type=int, default=1000, metavar="N",
                        help="manifest rows per shard (default: %(default)s); failed rows leave their shard smaller")
    parser.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar (default: %(default)s)")
    parser.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                        help="join this Ray cluster (default: start a local one for the job)")
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help="shard tasks at once (default: the cluster's CPUs; this machine's for a local cluster)")
    parser.add_argument("--media-column", default=None, metavar="NAME", help="the column with the media path/URL")
    parser.add_argument("--caption-column", default=None, metavar="NAME[,NAME...]",
                        help="caption column(s); each may hold a string or a list of strings")
    parser.add_argument("--retries", type=int, default=3, metavar="K",
                        help="retries of a failed read before it counts as a failure (default: %(default)s)")
    parser.add_argument("--retry-backoff", type=float, default=0.5, metavar="S",
                        help="seconds before the first retry, doubled for each next one (default: %(default)s)")
    proc = parser.add_argument_group("processing (off by default: the original bytes are stored)")
    proc.add_argument("--clip", action="store_true", help="cut videos to the manifest's start/end times")
    proc.add_argument("--max-duration", type=float, default=None, metavar="S", help="keep at most S seconds per video")
    proc.add_argument("--short-side", type=int, default=None, metavar="PX",
                      help="resize so that the shorter side is PX (videos re-encoded, images saved as jpg)")
    proc.add_argument("--fps", type=float, default=None, help="re-encode videos at this frame rate")
    proc.add_argument("--keyint", type=positive_int, default=None, metavar="N",
                      help="re-encode videos with a key frame at least every N frames: training decodes from the key "
                           "frame before each sampled frame, not from the start (e.g. 16 for long clips)")
    proc.add_argument("--codec", default="libx264", help="video encoder for re-encoding (default: %(default)s)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show the progress bar (default: when stderr is a terminal)")


def job_config(args: argparse.Namespace) -> ShardJobConfig:
    """Returns the job described by the parsed command line."""
    captions = tuple(c.strip() for c in args.caption_column.split(",") if c.strip()) if args.caption_column else ()
    return ShardJobConfig(
        input=args.input, out=args.out, samples_per_shard=args.samples_per_shard, prefix=args.prefix,
        media_column=args.media_column, caption_columns=captions, ray_address=args.ray_address, workers=args.workers,
        retry=RetryPolicy(attempts=args.retries + 1, backoff_s=args.retry_backoff),
        process=ProcessOptions(clip=args.clip, max_duration=args.max_duration, short_side=args.short_side,
                               fps=args.fps, keyint=args.keyint, codec=args.codec),
        progress=args.progress,
    )


def run(args: argparse.Namespace) -> int:
    outcome = shard_corpus(job_config(args))
    print(format_summary(outcome.summary), file=sys.stdout)
    return 0 if outcome.ok else 1
