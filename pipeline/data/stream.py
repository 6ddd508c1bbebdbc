"""Shards -> raw samples: deterministic sub-streams per (rank, worker) slot with an exact, tiny position.

The order of every slot's samples is a pure function of the shard list (names and sample counts), the seed, the
epoch and the layout (world size x workers). Shuffling is done on sample *references* (shard, sample index):
1. Each corpus is cut into units (whole shards; a shard is split into equal sample ranges when there are fewer
   shards than slots, so every slot has work). Epoch e permutes the units with a generator seeded by (seed, corpus,
   e); slot s of S takes units[s::S]. Across all slots each sample appears exactly once per epoch.
2. The slot reads its units in that order (its "read order") and emits them through a shuffle buffer of B
   references whose random picks come from a generator seeded by (seed, corpus, epoch, slot, S). The emission order
   is computed up front; the reader holds at most B not-yet-emitted samples' bytes.
3. Several corpora are mixed by weight: draw d of slot s picks a live corpus with a generator seeded by (seed, slot,
   S, d). With `epochs` set a corpus leaves the mix after that many epochs; the slot ends when all have left.
   With `per_batch` (`data.mix: batch`, the official MetaLoader's whole image or video batches) a draw picks the
   corpus of a whole batch: the reader tells the stream where each batch ends (`end_batch`), and draw d of slot s
   is seeded by (seed, d * W + s mod W) with W workers per rank, the rank's batch index, so every rank draws the
   same corpus for the same step. A corpus that runs out inside a batch (finite `epochs`) hands the batch's rest to
   a new draw.

A slot's position is therefore `{"draws": d, "corpora": [[epoch, emitted], ...]}`: restoring it recomputes the
emission order and re-reads only the buffered samples (tar headers of the samples in between are skipped by seeking),
so the slot yields exactly what it would have yielded next.

Resuming with another layout (`relayout`): the old slots' positions say exactly which references each has emitted;
they become per-epoch exclusions, and the new layout's slots start the oldest unfinished epoch with those samples
left out. Bound: no sample is repeated and none is skipped within an epoch (only the samples inside batches that
were prefetched but not consumed are re-read, as with the same layout); the shuffle order of the rest differs from
what the old layout would have produced.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import braceexpand
import fsspec
import numpy as np

from pipeline.config import ConfigError, read_json

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
MEDIA_KINDS = ("video", "image")
STATS_SUFFIX = "_stats.json"  # video2dataset / img2dataset: {shard}_stats.json beside {shard}.tar
SCAN_THREADS = 32  # tars scanned at once (object storage: latency-bound requests)
COUNTS_FILE = "corpus_counts.json"  # in the run folder: the counts of URL-pattern corpora, so a resume scans nothing


# ----------------------------------------------------------------------------------------------------- corpora
@dataclass(frozen=True)
class Corpus:
    """One entry of `data.train`: its shard URLs, their sample counts, and the declared media (None: per sample)."""

    source: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    media: Optional[str]
    damaged: tuple[tuple[str, str], ...] = ()  # (url, why) of tars cut short or unreadable: their readable samples
    # are counted and used, the rest reported (see `shard_counts`)

    @property
    def samples(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> str:
        names = [f"{posixpath.basename(u)}:{n}" for u, n in zip(self.urls, self.counts)]
        return hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]


def split_sources(train: str) -> list[str]:
    """Returns the entries of a comma-joined `data.train`, leaving commas inside brace patterns alone."""
    parts, depth, current = [], 0, ""
    for ch in train:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def resolved_corpus(source: str, strict: bool = False, known: Optional[dict] = None) -> Corpus:
    """Returns the corpus of a shard index (`.../index.json`) or a brace URL pattern. A pattern's sample counts come
    from `known` (what `known_counts` read from a run folder: a resume scans nothing), else from `shard_counts`
    (video2dataset's stats files, then a parallel scan of the remaining tars)."""
    if source.endswith(".json"):
        return _indexed_corpus(source, strict)
    urls = tuple(braceexpand.braceexpand(source))
    entry = (known or {}).get(source)
    if entry and tuple(entry.get("urls", ())) == urls:
        return Corpus(source, urls, tuple(entry["counts"]), None, tuple(map(tuple, entry.get("damaged", ()))))
    counts, damaged = shard_counts(urls, strict)
    return Corpus(source, urls, counts, None, damaged)


def _indexed_corpus(source: str, strict: bool = False) -> Corpus:
    index = read_json(source, "shard index", label="data.train: ")
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "url" in s for s in shards):
        raise ConfigError(f"data.train: {source} has no list of shards with a 'url' each under 'shards'")
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    urls = tuple(s["url"] if "://" in s["url"] or s["url"].startswith("/") else f"{base}/{s['url']}" for s in shards)
    uncounted = [u for s, u in zip(shards, urls) if "samples" not in s]
    scanned, damaged = shard_counts(uncounted, strict, stats_files=False) if uncounted else ((), ())
    found = dict(zip(uncounted, scanned))
    counts = tuple(int(s["samples"]) if "samples" in s else found[u] for s, u in zip(shards, urls))
    media = index.get("media")
    if media is not None and media not in MEDIA_KINDS:
        raise ConfigError(f"data.train: {source}: media must be one of {MEDIA_KINDS}, got {media!r}")
    return Corpus(source, urls, counts, media, damaged)


def shard_counts(urls: Sequence[str], strict: bool = False,
                 stats_files: bool = True) -> tuple[tuple[int, ...], tuple[tuple[str, str], ...]]:
    """Returns (the sample count of each tar, (url, why) of those cut short or unreadable).

    A tar with a video2dataset/img2dataset stats file beside it (`{shard}_stats.json`) counts its "successes" (the
    samples written into the tar); the rest are scanned, reading member headers only, in SCAN_THREADS threads. A tar
    that ends early (truncated) or cannot be opened counts the whole samples read before the damage: they are used,
    the damage is logged and kept in `Corpus.damaged`, and the run goes on (as a damaged shard inside an indexed
    corpus does); with `strict` it is refused (ConfigError naming the tar) instead."""
    counts: dict[str, int] = _stats_counts(urls) if stats_files else {}
    rest = [u for u in urls if u not in counts]
    damaged: list[tuple[str, str]] = []
    if rest:
        with ThreadPoolExecutor(min(SCAN_THREADS, len(rest)), thread_name_prefix="shard-scan") as pool:
            for url, (n, problem) in zip(rest, pool.map(_scanned, rest)):
                counts[url] = n
                if problem:
                    if strict:
                        raise ConfigError(f"data.train: cannot read shard {url}: {problem} (data.strict=true; "
                                          f"with false its {n} readable samples are used and the damage reported)")
                    log.warning("shard %s: %s; its %d whole samples before the damage are used, the rest is "
                                "counted as lost (data.strict=true refuses such a shard)", url, problem, n)
                    damaged.append((url, problem))
    return tuple(counts[u] for u in urls), tuple(damaged)


def _scanned(url: str) -> tuple[int, Optional[str]]:
    """Returns (samples in the tar, None), or (whole samples before the damage, what the damage is) for a tar cut
    short (a header or a member's data past the end of the file) or unreadable. Reads member headers only; the
    sample in progress when the damage shows is not counted (it may lack members)."""
    done, key = 0, None
    try:
        with fsspec.open(url, "rb") as raw:
            size = raw.seek(0, 2)
            raw.seek(0)
            with tarfile.open(fileobj=raw, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, _ = sample_key(member.name)
                    if k != key:
                        done, key = done + (key is not None), k
                    if member.offset_data + member.size > size:
                        return done, (f"cut short: member {member.name} ends at byte "
                                      f"{member.offset_data + member.size}, the file has {size}")
                end = tar.offset  # tarfile ends quietly at a partial or invalid header: look at what stopped it
            raw.seek(end)
            block = raw.read(tarfile.BLOCKSIZE)
            if block.strip(b"\0"):
                why = "cut short inside a header" if len(block) < tarfile.BLOCKSIZE else "an invalid header"
                return done, f"{why} at byte {end} of {size}"
    except (OSError, tarfile.TarError, EOFError) as e:
        return done, f"{type(e).__name__}: {e}"
    return done + (key is not None), None


def _stats_counts(urls: Sequence[str]) -> dict[str, int]:
    """Returns {tar url: samples} from the stats files beside the tars, listing each folder once and fetching the
    files together (concurrently on object storage); tars without a readable one are left out."""
    wanted = {u[:-len(".tar")] + STATS_SUFFIX: u for u in urls if u.endswith(".tar")}
    if not wanted:
        return {}
    found: dict[str, int] = {}
    folders: dict[str, list[str]] = {}
    for stats in wanted:
        folders.setdefault(stats.rsplit("/", 1)[0] if "/" in stats else ".", []).append(stats)
    for folder, names in folders.items():
        try:
            fs, path = fsspec.core.url_to_fs(names[0])
            present = {posixpath.basename(p) for p in fs.ls(path.rsplit("/", 1)[0], detail=False)}
        except (OSError, ValueError):
            continue
        names = [n for n in names if posixpath.basename(n) in present]
        if not names:
            continue
        paths = [fsspec.core.url_to_fs(n)[1] for n in names]
        raw = fs.cat(paths, on_error="return") if len(paths) > 1 else {paths[0]: fs.cat(paths[0])}
        for name, p in zip(names, paths):
            try:
                successes = json.loads(raw[p])["successes"]
            except (TypeError, ValueError, KeyError):  # an error object, not JSON, no "successes"
                continue
            if isinstance(successes, int) and successes >= 0:
                found[wanted[name]] = successes
    return found


def known_counts(run_dir: Optional[str]) -> dict:
    """Returns the counts kept in a run folder by `keep_counts` ({} when there are none)."""
    if not run_dir:
        return {}
    try:
        with fsspec.open(posixpath.join(run_dir, COUNTS_FILE), "r") as f:
            kept = json.load(f)
    except (FileNotFoundError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def keep_counts(run_dir: str, corpora: Sequence[Corpus]) -> None:
    """Writes the counts of the URL-pattern corpora to the run folder (atomically), for a resume to read."""
    kept = {c.source: {"urls": list(c.urls), "counts": list(c.counts), "damaged": [list(d) for d in c.damaged]}
            for c in corpora if not c.source.endswith(".json")}
    if not kept:
        return
    fs, path = fsspec.core.url_to_fs(posixpath.join(run_dir, COUNTS_FILE))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path + ".part", json.dumps(kept, indent=1).encode())
    fs.mv(path + ".part", path)


# ---------------------------------------------------------------------------------------------------- tar reading
def sample_key(member_name: str) -> tuple[str, str]:
    """Returns (key, extension) of a tar member as WebDataset groups them: the extension starts at the first dot
    of the file name."""
    directory, name = posixpath.split(member_name)
    stem, _, ext = name.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


def _tar_samples(url: str, wanted) -> Iterator[tuple[str, Optional[dict[str, bytes]]]]:
    """Yields (key, files) per sample of a tar in order; files is {extension: bytes} for samples whose index
    `wanted(i)` accepts, else None (their data is skipped by seeking)."""
    with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        index, key, files = -1, None, None
        for member in tar:
            if not member.isfile():
                continue
            k, ext = sample_key(member.name)
            if k != key:
                if key is not None:
                    yield key, files
                index, key = index + 1, k
                files = {} if wanted(index) else None
            if files is not None:
                files[ext] = tar.extractfile(member).read()
        if key is not None:
            yield key, files


@dataclass
class RawSample:
    """A sample as read from a shard (files is None when it could not be read: `problem` says why)."""

    corpus: int
    epoch: int
    shard: int
    index: int
    key: str
    files: Optional[dict[str, bytes]]
    problem: Optional[str] = None


def shard_run_samples(url: str, indices: list[int],
                      counted: Optional[int] = None) -> Iterator[tuple[int, str, Optional[dict], Optional[str]]]:
    """Yields (sample index, key, files, problem) for the increasing `indices` of one shard, in that order.

    A sample the tar does not have (short or truncated tar) comes back with problem "missing_sample"; a tar that
    cannot be opened at all gives "unreadable_shard" for each index not yet yielded. When the run reads the last of
    the `counted` samples the shard is believed to hold, a sample after it (a count that came from a stats file that
    counted source videos, not the clips written) is reported once per shard: those samples are not read.
    """
    want = set(indices)
    pending = iter(indices)
    nxt = next(pending, None)
    try:
        samples = enumerate(_tar_samples(url, wanted=want.__contains__))
        for i, (key, files) in samples:
            if nxt is None:
                return
            if i == nxt:
                if counted is not None and i == counted - 1 and _more_after(samples):
                    _report_uncounted(url, counted)  # looked at before the yield: the reader may stop after it
                yield i, key, files, None
                nxt = next(pending, None)
    except (OSError, tarfile.TarError, EOFError) as e:
        problem = "unreadable_shard"
        log.warning("shard %s cannot be read (%s: %s); its remaining samples are counted as unreadable_shard", url,
                    type(e).__name__, e)
    else:
        problem = "missing_sample"
        if nxt is not None:
            log.warning("shard %s ends before sample %d (fewer samples than its index says); the rest are counted "
                        "as missing_sample", url, nxt)
    while nxt is not None:
        yield nxt, "", None, problem
        nxt = next(pending, None)


_UNCOUNTED_REPORTED: set[str] = set()


def _more_after(samples: Iterator) -> bool:
    """True when the tar has another sample (damage after the counted samples is no such sample)."""
    try:
        return next(samples, None) is not None
    except (OSError, tarfile.TarError, EOFError):
        return False


def _report_uncounted(url: str, counted: int) -> None:
    if url not in _UNCOUNTED_REPORTED:
        _UNCOUNTED_REPORTED.add(url)
        log.warning("shard %s holds more than the %d samples its count says (its index entry, or a video2dataset "
                    "stats file that counts source videos, not the clips written); the samples after them are not "
                    "read. Remove its %s (and the run folder's %s) to have the tar scanned instead", url, counted,
                    STATS_SUFFIX, COUNTS_FILE)


# ---------------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Everything the order of samples depends on besides the shards themselves."""

    seed: int
    world_size: int
    slots_per_rank: int  # DataLoader workers per rank (1 when the loader runs in-process)
    shuffle: bool
    buffer: int
    epochs: Optional[int]

    @property
    def slots(self) -> int:
        return self.world_size * self.slots_per_rank

    def as_dict(self) -> dict:
        return dict(seed=self.seed, world_size=self.world_size, slots_per_rank=self.slots_per_rank,
                    shuffle=self.shuffle, buffer=self.buffer, epochs=self.epochs)


Exclusions = dict[int, dict[int, set[int]]]  # epoch -> shard -> sample indices already emitted elsewhere


@dataclass
class StreamSpec:
    corpora: list[Corpus]
    weights: list[float]
    layout: Layout
    exclusions: list[Exclusions] = field(default_factory=list)  # per corpus (after a resume with another layout)
    per_batch: bool = False  # one corpus draw per batch (data.mix: batch), not per sample

    def excluded(self, corpus: int, epoch: int) -> dict[int, set[int]]:
        return self.exclusions[corpus].get(epoch, {}) if self.exclusions else {}

    def describe(self, slot: int, limit: int = 4) -> str:
        """Names the shards that `slot` reads in its first epoch (for messages)."""
        urls: list[str] = []
        for c, corpus in enumerate(self.corpora):
            shards, _ = read_order(self, c, 0, slot)
            urls += [corpus.urls[s] for s in dict.fromkeys(shards.tolist())]
        more = f" and {len(urls) - limit} more" if len(urls) > limit else ""
        return f"reader {slot} of {self.layout.slots}: {', '.join(urls[:limit])}{more}"


def corpus_units(corpus: Corpus, slots: int) -> list[tuple[int, int, int]]:
    """Returns the units (shard, first, stop) of a corpus: whole shards, or equal parts when shards < slots."""
    parts = max(1, math.ceil(slots / max(1, len(corpus.urls))))
    units = []
    for shard, n in enumerate(corpus.counts):
        edges = np.linspace(0, n, parts + 1).round().astype(int)
        units += [(shard, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return units


def read_order(spec: StreamSpec, corpus: int, epoch: int, slot: int, layout: Optional[Layout] = None,
               excluded: Optional[dict[int, set[int]]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (shard ids, sample indices) that `slot` reads in `epoch` of `corpus`, in reading order."""
    layout = layout or spec.layout
    excluded = spec.excluded(corpus, epoch) if excluded is None else excluded
    units = corpus_units(spec.corpora[corpus], layout.slots)
    order = np.arange(len(units))
    if layout.shuffle:
        order = np.random.default_rng([layout.seed, corpus, epoch]).permutation(len(units))
    shards, samples = [], []
    for u in order[slot::layout.slots]:
        shard, first, stop = units[u]
        idx = np.arange(first, stop)
        if shard in excluded:
            idx = idx[~np.isin(idx, list(excluded[shard]))]
        shards.append(np.full(len(idx), shard))
        samples.append(idx)
    if not shards:
        return np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(shards), np.concatenate(samples)


def emission_order(n: int, layout: Layout, corpus: int, epoch: int, slot: int) -> np.ndarray:
    """Returns the order (indices into the read order) in which a shuffle buffer of `layout.buffer` emits n reads."""
    if not layout.shuffle or layout.buffer <= 1:
        return np.arange(n)
    rng = np.random.default_rng([layout.seed, corpus, epoch, slot, layout.slots, 1])
    picks = rng.random(n)  # one uniform per emission, drawn up front: the pick is floor(u * buffer length)
    buf: list[int] = []
    out = np.empty(n, dtype=np.int64)
    j = 0
    for i in range(n):
        buf.append(i)
        if len(buf) >= layout.buffer:
            j = _emit(buf, picks, out, j)
    while buf:
        j = _emit(buf, picks, out, j)
    return out


def _emit(buf: list[int], picks: np.ndarray, out: np.ndarray, j: int) -> int:
    k = int(picks[j] * len(buf))
    buf[k], buf[-1] = buf[-1], buf[k]
    out[j] = buf.pop()
    return j + 1


# ------------------------------------------------------------------------------------------------- corpus stream
class CorpusStream:
    """One corpus as seen by one slot: an endless (or `epochs`-bounded) sequence of RawSamples with position
    (epoch, emitted-in-epoch)."""

    def __init__(self, spec: StreamSpec, corpus: int, slot: int, epoch: int = 0, pos: int = 0):
        self.spec, self.corpus, self.slot = spec, corpus, slot
        self.epoch, self.pos = epoch, pos
        # a corpus with fewer samples than there are slots leaves some slots without a unit in every epoch
        self.idle = slot >= len(corpus_units(spec.corpora[corpus], spec.layout.slots))
        self._load_epoch()

    @property
    def exhausted(self) -> bool:
        epochs = self.spec.layout.epochs
        return self.idle or (epochs is not None and self.epoch >= epochs)

    def position(self) -> list[int]:
        return [self.epoch, self.pos]

    def next(self) -> Optional[RawSample]:
        """Returns the next sample, or None once the corpus has done its epochs."""
        if self.exhausted:
            return None
        target = int(self._emit[self.pos])
        while target not in self._held:
            read = next(self._reader)
            self._held[read[0]] = read[1:]
        shard, index, key, files, problem = self._held.pop(target)
        sample = RawSample(self.corpus, self.epoch, int(shard), int(index), key, files, problem)
        self.pos += 1
        if self.pos >= len(self._emit):
            self.epoch, self.pos = self.epoch + 1, 0
            self._load_epoch()
        return sample

    def _load_epoch(self) -> None:
        """Computes this epoch's orders and opens the reader at the first read still to be emitted, rolling over
        epochs this slot has nothing left in (a corpus without samples is refused when the stream is built)."""
        for _ in range(2 + (len(self.spec.exclusions[self.corpus]) if self.spec.exclusions else 0)):
            if self.exhausted:
                return
            self._shards, self._samples = read_order(self.spec, self.corpus, self.epoch, self.slot)
            self._emit = emission_order(len(self._shards), self.spec.layout, self.corpus, self.epoch, self.slot)
            if self.pos < len(self._emit):
                break
            self.epoch, self.pos = self.epoch + 1, 0
        else:
            raise ValueError(f"slot {self.slot} has no samples of {self.spec.corpora[self.corpus].source}")
        pending = self._emit[self.pos:]
        self._held: dict[int, tuple] = {}
        self._reader = self._reads(set(pending.tolist()), int(pending.min()))

    def _reads(self, needed: set[int], start: int) -> Iterator[tuple]:
        """Yields (read index, shard, sample index, key, files, problem) for the needed reads from `start` on,
        one tar pass per run of consecutive reads from the same shard."""
        corpus = self.spec.corpora[self.corpus]
        i, n = start, len(self._shards)
        while i < n:
            shard = int(self._shards[i])
            j = i
            while j < n and self._shards[j] == shard and (j == i or self._samples[j] > self._samples[j - 1]):
                j += 1
            run = [r for r in range(i, j) if r in needed]
            if run:
                by_index = {int(self._samples[r]): r for r in run}
                for index, key, files, problem in shard_run_samples(corpus.urls[shard], sorted(by_index),
                                                                    corpus.counts[shard]):
                    yield by_index[index], shard, index, key, files, problem
            i = j


# -------------------------------------------------------------------------------------------------- slot stream
class SlotStream:
    """The mixed stream of one (rank, worker) slot; `state()` is its exact position."""

    def __init__(self, spec: StreamSpec, slot: int, state: Optional[dict] = None):
        self.spec, self.slot = spec, slot
        state = state or {}
        positions = state.get("corpora") or [[0, 0]] * len(spec.corpora)
        self.draws = int(state.get("draws", 0))
        self.held: Optional[int] = state.get("held")  # per_batch: the corpus of the batch being read
        self.streams = [CorpusStream(spec, c, slot, int(e), int(p)) for c, (e, p) in enumerate(positions)]

    def state(self) -> dict:
        out = {"draws": self.draws, "corpora": [s.position() for s in self.streams]}
        if self.held is not None:
            out["held"] = self.held
        return out

    def end_batch(self) -> None:
        """With `spec.per_batch`: the batch being read is complete; the next sample starts a new draw."""
        self.held = None

    def __iter__(self) -> Iterator[RawSample]:
        while True:
            live = [c for c, s in enumerate(self.streams) if not s.exhausted]
            if not live:
                return
            if not self.spec.per_batch:
                c = self._pick(live, [self.spec.layout.seed, self.slot, self.spec.layout.slots, self.draws, 2])
                self.draws += 1
            else:
                if self.held not in live:
                    per_rank = self.spec.layout.slots_per_rank
                    step = self.draws * per_rank + self.slot % per_rank
                    self.held = self._pick(live, [self.spec.layout.seed, step, 4])
                    self.draws += 1
                c = self.held
            yield self.streams[c].next()

    def _pick(self, live: list[int], key: list[int]) -> int:
        if len(live) == 1:
            return live[0]
        w = np.asarray([self.spec.weights[c] for c in live], dtype=float)
        u = np.random.default_rng(key).random()
        return live[int(np.searchsorted(np.cumsum(w / w.sum()), u, side="right").clip(max=len(live) - 1))]


# ---------------------------------------------------------------------------------------------------- relayout
def emitted_refs(spec: StreamSpec, layout: Layout, corpus: int, slot: int, epoch: int, pos: int,
                 excluded: dict[int, set[int]]) -> dict[int, set[int]]:
    """Returns {shard: sample indices} that `slot` of `layout` emitted in `epoch` before position `pos`."""
    shards, samples = read_order(spec, corpus, epoch, slot, layout, excluded)
    if pos < len(shards):
        picked = emission_order(len(shards), layout, corpus, epoch, slot)[:pos]
        shards, samples = shards[picked], samples[picked]
    out: dict[int, set[int]] = {}
    for s, i in zip(shards.tolist(), samples.tolist()):
        out.setdefault(s, set()).add(i)
    return out


def relayout(spec: StreamSpec, old_layout: Layout, old_exclusions: list[Exclusions],
             old_slots: list[dict]) -> tuple[list[Exclusions], list[list[int]]]:
    """Returns (exclusions per corpus, [epoch, 0] start position per corpus) for `spec`'s layout, from the positions
    of all slots of an old layout (`old_slots[s]` is slot s's state)."""
    if len(old_slots) != old_layout.slots:
        raise ValueError(f"resuming with another layout needs the positions of all {old_layout.slots} old slots "
                         f"(every rank's state), got {len(old_slots)}")
    exclusions, starts = [], []
    for c in range(len(spec.corpora)):
        positions = [tuple(s["corpora"][c]) for s in old_slots]
        first = min(e for e, _ in positions)
        old = old_exclusions[c] if old_exclusions else {}
        excl: Exclusions = {}
        for slot, (epoch, pos) in enumerate(positions):
            last = epoch if old_layout.epochs is None else min(epoch, old_layout.epochs)
            for e in range(first, last + 1):
                done = emitted_refs(spec, old_layout, c, slot, e, pos if e == epoch else 1 << 62, old.get(e, {}))
                for shard, idx in done.items():
                    excl.setdefault(e, {}).setdefault(shard, set()).update(idx)
        for e, shards in old.items():
            if e >= first:
                for shard, idx in shards.items():
                    excl.setdefault(e, {}).setdefault(shard, set()).update(idx)
        exclusions.append(excl)
        starts.append([first, 0])
    return exclusions, starts


def exclusions_to_state(exclusions: list[Exclusions]) -> list[dict]:
    """Returns JSON-friendly exclusions: {epoch: {shard: [[first, stop), ...]]}} per corpus."""
    return [{str(e): {str(s): _ranges(sorted(idx)) for s, idx in shards.items()} for e, shards in ex.items()}
            for ex in exclusions]


def exclusions_from_state(raw: list[dict]) -> list[Exclusions]:
    return [{int(e): {int(s): {i for a, b in rs for i in range(a, b)} for s, rs in shards.items()}
             for e, shards in ex.items()} for ex in raw]


def _ranges(sorted_idx: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted_idx:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out
