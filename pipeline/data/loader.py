"""`build_loader`: the streaming video-text loader the stages train on, with an exact resume position.

Each rank runs `num_workers` DataLoader workers; logical worker w of rank r is slot r * num_workers + w of
`pipeline.data.stream`. Workers read, plan and (with the CPU decoder) decode and collate whole batches; each batch
carries its worker's position after it. The DataLoader takes batches from its workers round-robin (skipping workers
that have finished), so the main process knows, from the batches it has handed out, every worker's position and
which worker is next. `state_dict()` is those positions; a loader restored from it starts DataLoader worker k as
logical worker (next + k) % num_workers, so the round-robin continues where it stopped and the batches are exactly
those an uninterrupted run would have yielded next (same world size and worker count). With another layout see
`pipeline.data.stream.relayout` for the bound.

With the CPU decoder the workers hand over 8-bit pixels (a quarter of float32's bytes through the workers' shared
memory; pinned where there is a GPU) and the main process copies them to the device it hands clips out on (the
current GPU, else the CPU) and normalizes them there. With the DALI decoder the workers hand over encoded bytes and
plans (`dali_ready`: the stream trimmed to the packets the plan needs), and the main process decodes on the GPU:
background threads decode groups of consecutive batches (`DaliSettings`) while the training step runs, and the
batches are handed out in their original order; a batch's position (and the skips DALI met in it) counts only when
the batch is handed out, so prefetching changes neither the resume position nor `stats()`. With `hybrid` decoding
both run: each worker hands its next batch on encoded while DALI has room (`DaliBacklog`) and decodes it itself
otherwise, so the CPU cores add their clips to what NVDEC decodes; `decoded` counts the samples each one gave.
Skipped samples are counted by kind in the worker that met them (part of its position); `stats()` sums them.
Kinds: corrupt_video, corrupt_image, empty_video (no video stream or no frames), missing_caption (no usable
`{key}.json` "captions" nor `{key}.txt`), bad_metadata (`{key}.json` not JSON, or "captions" not strings),
missing_media (no video/image file), wrong_type (an image in a video corpus or the reverse), missing_sample and
unreadable_shard (a tar shorter than its index says, or one that cannot be opened; logged with the shard's URL).
damaged_shards (rank 0 only) is the number of tars of URL-pattern corpora found cut short or unreadable when they
were counted: their whole samples before the damage are used (`pipeline.data.stream.shard_counts`).
A reader that goes through a whole epoch of its shards without one usable sample raises NoUsableSamples naming
them: an endless stream would otherwise wait forever for a batch that cannot come.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import queue
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import ConfigError, DataConfig
from pipeline.data.decode import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, CpuDecoder, DaliDecoder, DecodeError,
                                  EncodedSample, MediaSource, dali_device, opened, resolved_decoder_name)
from pipeline.data.stream import (Corpus, Layout, RawSample, SlotStream, StreamSpec, exclusions_from_state,
                                  exclusions_to_state, keep_counts, known_counts, relayout, resolved_corpus,
                                  split_sources)
from pipeline.data.transforms import NORMALIZATIONS, clip_plan, normalized

STATE_VERSION = 1
ORDER_FIELDS = ("seed", "world_size", "slots_per_rank", "shuffle", "buffer")  # what the sample order depends on


# --------------------------------------------------------------------------------------------------- one sample
def sample_media(raw: RawSample, declared: Optional[str]) -> tuple[str, bytes]:
    """Returns ("video"|"image", bytes) of a raw sample; raises DecodeError naming what is wrong."""
    ext = next((e for e in VIDEO_EXTENSIONS if e in raw.files), None)
    media = "video"
    if ext is None:
        ext, media = next((e for e in IMAGE_EXTENSIONS if e in raw.files), None), "image"
    if ext is None:
        raise DecodeError("missing_media", f"sample {raw.key} has no video or image file ({sorted(raw.files)})")
    if declared is not None and media != declared:
        raise DecodeError("wrong_type", f"sample {raw.key} holds a {ext} in a corpus of {declared}s")
    return media, raw.files[ext]


def sample_captions(raw: RawSample) -> list[str]:
    """Returns the captions of a raw sample: `{key}.json` "captions", else `{key}.txt`."""
    if "json" in raw.files:
        try:
            meta = json.loads(raw.files["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DecodeError("bad_metadata", f"sample {raw.key}: {raw.key}.json is not JSON ({e})") from None
        captions = meta.get("captions") if isinstance(meta, dict) else None
        if isinstance(captions, str):
            captions = [captions]
        if captions is not None:
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise DecodeError("bad_metadata", f"sample {raw.key}: 'captions' is not a list of strings")
            captions = [c.strip() for c in captions if c.strip()]
            if captions:
                return captions
    if "txt" in raw.files:
        text = raw.files["txt"].decode("utf-8", errors="replace").strip()
        if text:
            return [text]
    raise DecodeError("missing_caption", f"sample {raw.key} has no caption ({raw.key}.json/.txt)")


class SamplePlanner:
    """Turns raw samples into (EncodedSample, caption, captions), deterministic given the sample and its epoch."""

    def __init__(self, corpora: list[Corpus], seed: int, num_frames: int, img_size: int, fps: Optional[float],
                 train: bool, crop: str, normalize: str, image_frames: Optional[int] = None):
        self.media = [c.media for c in corpora]
        self.seed, self.num_frames, self.img_size, self.fps, self.train = seed, num_frames, img_size, fps, train
        # frames of an image's clip: num_frames (repeated) when a batch mixes images and videos, 1 in whole image
        # batches (data.mix=batch, the official use_image)
        self.image_frames = num_frames if image_frames is None else image_frames
        self.crop, self.normalize = crop, normalize  # data.crop, data.normalize: every decoder follows the plan

    @contextmanager
    def planned(self, raw: RawSample) -> Iterator[tuple[EncodedSample, str, list[str], MediaSource]]:
        """Yields (EncodedSample, caption, captions, the media opened: decode from it, it was planned from it);
        closes the media after."""
        if raw.files is None:
            raise DecodeError(raw.problem or "missing_sample", f"sample {raw.index} of shard {raw.shard} unreadable")
        media, data = sample_media(raw, self.media[raw.corpus])
        captions = sample_captions(raw)
        with opened(data, media) as source:
            info = source.info
            rng = np.random.default_rng([self.seed, raw.corpus, raw.epoch, raw.shard, raw.index, 3])
            text = captions[int(rng.integers(len(captions)))]
            frames = self.image_frames if media == "image" else self.num_frames
            plan = clip_plan(info.frames, info.fps, info.width, info.height, frames, self.img_size, self.train,
                             self.fps, rng, crop=self.crop, normalize=self.normalize)
            yield EncodedSample(raw.key, media, data, plan), text, captions, source


# ------------------------------------------------------------------------------------------- one worker's batches
def slot_batches(spec: StreamSpec, slot: int, state: dict, batch_size: int, planner: SamplePlanner,
                 decode_here: bool, backlog: Optional["DaliBacklog"] = None) -> Iterator[dict]:
    """Yields the batches of one slot from `state` on, each with the slot's state after it under "state".

    The clips are decoded here (`decode_here`) or handed on encoded for DALI; with a `backlog` (hybrid decoding)
    that is decided batch by batch: a batch is decoded here when DALI already has enough samples waiting.

    The last batch (without samples when the stream ended on a full batch) has "done" in its state, and carries
    the skips met after the last sample, so no skip goes uncounted and the main process knows the slot finished.
    """
    stream = SlotStream(spec, slot, state.get("stream"))
    skips = Counter(state.get("skips", {}))
    cpu = CpuDecoder()

    def decodes_here() -> bool:  # where the next batch is decoded
        return decode_here if backlog is None else backlog.full()

    def handed_on(state: dict) -> dict:  # the batch of `items`, its samples counted in the backlog when DALI's
        if backlog is not None and not here:
            backlog.add(len(items))
        return collated(items, state)

    here = decodes_here()
    items: list[tuple] = []
    skipping_since: Optional[list[int]] = None  # the corpora's epochs at the first skip after a usable sample
    for raw in stream:
        try:
            with planner.planned(raw) as (encoded, text, captions, source):
                clip = cpu.pixels_one(encoded, source) if here else None
                if not here:  # for DALI, in the workers: see dali_ready
                    encoded = source.dali_ready(encoded)
        except DecodeError as e:
            skips[e.kind] += 1
            skipping_since = skipping_since or epochs_of(stream)
            if all(now > then + 1 for now, then in zip(epochs_of(stream), skipping_since)):
                raise NoUsableSamples(f"data.train: a whole epoch of this reader's shards ({spec.describe(slot)}) "
                                      f"gave no usable sample (skipped so far: {dict(skips)}); check that the tars "
                                      f"the index lists exist and hold the media the corpus declares") from None
            continue
        skipping_since = None
        items.append((encoded, text, captions, clip))
        if len(items) == batch_size:
            stream.end_batch()  # data.mix=batch: the next batch draws its corpus anew
            yield handed_on({"stream": stream.state(), "skips": dict(skips)})
            items = []
            here = decodes_here()
    yield handed_on({"stream": stream.state(), "skips": dict(skips), "done": True})


class NoUsableSamples(RuntimeError):
    """A reader went through a whole epoch of its shards without one sample it could use (an endless stream would
    otherwise wait forever for its first batch)."""


def epochs_of(stream: SlotStream) -> list[int]:
    return [epoch for epoch, _ in stream.state()["corpora"]]


def collated(items: list[tuple], state: dict) -> dict:
    """Returns a batch of (encoded, text, captions, uint8 pixels or None) items: "pixels" when the clips were
    decoded here (the main process normalizes them, see `StreamingLoader`), else "encoded" (the samples for the main
    process's decoder); an empty batch only carries its state."""
    encoded = [i[0] for i in items]
    is_image = [e.media == "image" for e in encoded]
    batch = {"text": [i[1] for i in items], "captions": [i[2] for i in items], "key": [e.key for e in encoded],
             "is_image": torch.tensor(is_image, dtype=torch.bool), "images_only": bool(items) and all(is_image),
             "state": state}
    if not items:
        return batch
    if items[0][3] is not None:
        batch["pixels"] = torch.stack([i[3] for i in items])
    else:
        batch["encoded"] = encoded
    return batch


class WorkerBatches(IterableDataset):
    """The DataLoader's dataset: worker k plays logical worker (first + k) % n of this rank."""

    def __init__(self, spec: StreamSpec, rank: int, states: list[dict], first: int, batch_size: int,
                 planner: SamplePlanner, decode_here: bool, backlog: Optional["DaliBacklog"] = None):
        self.spec, self.rank, self.states, self.first = spec, rank, states, first
        self.batch_size, self.planner, self.decode_here, self.backlog = batch_size, planner, decode_here, backlog

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n = len(self.states)
        logical = (self.first + (info.id if info else 0)) % n
        slot = self.rank * n + logical
        for batch in slot_batches(self.spec, slot, self.states[logical], self.batch_size, self.planner,
                                  self.decode_here, self.backlog):
            batch["worker"] = logical
            yield batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------- DALI decoding
@dataclass(frozen=True)
class DaliSettings:
    """How the main process drives DALI. Its video decoder is fast only with many clips in flight: each clip is
    decoded by one thread, frame by frame with a synchronize per frame, so one small synchronous run per training
    batch (8 clips, a few threads) leaves NVDEC idle most of the time. Hence: `batch` samples per DALI run (whole
    training batches are grouped up to it), `threads` per pipeline, and `pipelines` decoders running concurrently
    in background threads (each with its own CUDA stream and thread pool), so one group's slowest clip does not
    stall the next group, and decoding overlaps the training step."""

    batch: int = 32
    threads: int = 8
    pipelines: int = 2
    # hybrid decoding: a worker decodes a batch itself while this many samples wait for DALI (None: what DALI
    # works on at once, batch x (pipelines + 1))
    backlog: Optional[int] = None

    def __post_init__(self):
        if self.batch < 1 or self.threads < 1 or self.pipelines < 1:
            raise ValueError(f"DALI settings must be positive, got {self}")
        if self.backlog is not None and 0 < self.backlog < self.batch:
            # a DALI run would wait for samples that the workers hold back while the backlog is full
            raise ValueError(f"the DALI backlog must be 0 (every batch on the CPU) or at least the DALI batch "
                             f"({self.batch}), got {self.backlog}")
        if self.backlog is not None and self.backlog < 0:
            raise ValueError(f"the DALI backlog must not be negative, got {self.backlog}")

    def backlog_limit(self) -> int:
        return self.batch * (self.pipelines + 1) if self.backlog is None else self.backlog


class DaliBacklog:
    """The samples handed on for DALI and not decoded yet, counted across the loader's processes (hybrid
    decoding): the workers add the samples of each batch they hand on encoded, the main process takes them off as
    DALI decodes them, and a worker decodes its next batch itself while the count is at `limit`. So DALI gets all
    it can take and the CPU workers the rest, whatever the machine's balance of cores and decoders."""

    def __init__(self, limit: int):
        self.limit = limit
        self._waiting = multiprocessing.Value("l", 0)

    def full(self) -> bool:
        return self._waiting.value >= self.limit

    def add(self, samples: int) -> None:
        with self._waiting.get_lock():
            self._waiting.value += samples

    def done(self, samples: int) -> None:
        self.add(-samples)


def default_dali_settings() -> DaliSettings:
    return DaliSettings(threads=max(1, min(DaliSettings.threads, os.cpu_count() or 1)))


def batch_groups(batches: Iterable[dict], samples: int) -> Iterator[list[dict]]:
    """Yields consecutive worker batches in groups holding at least `samples` encoded samples (the last group may
    hold fewer), each group of clips of one frame count (one decode stacks them: with data.mix=batch an image
    batch's clips have one frame); batches without encoded samples (decoded in the workers, or empty) ride along
    in their place, or go on at once, in a group of their own, when no encoded sample is waiting before them."""
    group, count, frames = [], 0, None
    for batch in batches:
        encoded = batch.get("encoded", ())
        if not encoded and not count:
            yield group + [batch]
            group = []
            continue
        if encoded and count and len(encoded[0].plan.indices) != frames:
            yield group
            group, count = [], 0
        if encoded:
            frames = len(encoded[0].plan.indices)
        group.append(batch)
        count += len(encoded)
        if count >= samples:
            yield group
            group, count = [], 0
    if group:
        yield group


def split_decoded(group: list[dict], video: Optional[torch.Tensor], failures: list[tuple[int, str]]) -> list[dict]:
    """Returns the group's batches with "encoded" replaced by their rows of `video` (the clips of the samples that
    decoded, in order) and "decode_skips" (the kinds of those that did not); other fields follow the kept samples."""
    failed = dict(failures)
    out, first, row = [], 0, 0
    for batch in group:
        encoded = batch.pop("encoded", None)
        if encoded is None:
            out.append(batch)
            continue
        keep = [i for i in range(len(encoded)) if first + i not in failed]
        kinds = [failed[first + i] for i in range(len(encoded)) if first + i in failed]
        first += len(encoded)
        out.append({"video": video[row:row + len(keep)], "text": [batch["text"][i] for i in keep],
                    "captions": [batch["captions"][i] for i in keep], "key": [batch["key"][i] for i in keep],
                    "is_image": batch["is_image"][keep], "images_only": batch["images_only"],
                    "state": batch["state"], "worker": batch["worker"], "decode_skips": kinds})
        row += len(keep)
    return out


# ------------------------------------------------------------------------------------------------------ the loader
def handed_device() -> torch.device:
    """Where the loader hands its clips out: the current GPU where there is one (where the step runs), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class StreamingLoader:
    """Iterable of batches with `state_dict()`, `load_state_dict()` and `stats()` (see the module docstring)."""

    def __init__(self, spec: StreamSpec, rank: int, num_workers: int, batch_size: int, planner: SamplePlanner,
                 decoder: str, dali: Optional[DaliSettings] = None, device: Optional[torch.device] = None):
        self.spec, self.rank, self.num_workers, self.batch_size = spec, rank, num_workers, batch_size
        self.planner, self.decoder_name = planner, decoder
        self.device = device  # where the CPU decoder's clips are handed out; None: `handed_device()`
        self.dali = dali or default_dali_settings()
        self._dali_decoders: list[DaliDecoder] = []
        self._backlog: Optional[DaliBacklog] = None
        self.decoded: Counter = Counter()  # samples handed out, by the decoder that decoded them ("cpu", "dali")
        self._reset()

    def _reset(self) -> None:
        self._slots = [{} for _ in range(self.spec.layout.slots_per_rank)]
        self._next = 0
        self._main_skips: Counter = Counter()

    # ------------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        if self._finished():
            self._reset()
        batches = self._worker_batches()
        if self.decoder_name != "cpu":
            batches = self._dali_decoded(batches)
        for batch in batches:  # the position moves only here, as each batch is handed out
            self._slots[batch["worker"]] = batch.pop("state")
            self._next = (batch.pop("worker") + 1) % len(self._slots)
            self._main_skips.update(batch.pop("decode_skips", ()))
            if "pixels" in batch:
                batch["video"] = normalized(batch.pop("pixels").to(self._device(), non_blocking=True),
                                            *NORMALIZATIONS[self.planner.normalize])
                self.decoded["cpu"] += len(batch["key"])
            elif batch["key"]:
                self.decoded["dali"] += len(batch["key"])
            if batch["key"]:
                yield batch

    def _worker_batches(self) -> Iterator[dict]:
        self._backlog = DaliBacklog(self.dali.backlog_limit()) if self.decoder_name == "hybrid" else None
        dataset = WorkerBatches(self.spec, self.rank, self._slots, self._next, self.batch_size, self.planner,
                                decode_here=self.decoder_name == "cpu", backlog=self._backlog)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, worker_init_fn=_worker_init,
                               prefetch_factor=2, pin_memory=self._device().type == "cuda",
                               # the workers' base seed must not come from the global RNG: the DataLoader starts on
                               # the first batch, after a resumed trainer restored that RNG, and would shift it
                               generator=torch.Generator()))

    def _dali_decoded(self, batches: Iterator[dict]) -> Iterator[dict]:
        """Yields `batches` in order with their samples decoded by DALI: groups of batches are decoded by
        `self.dali.pipelines` decoders in background threads, up to one group more than decoders in flight."""
        free: queue.SimpleQueue = queue.SimpleQueue()
        for decoder in self._decoders():
            free.put(decoder)
        backlog = self._backlog

        def decoded(group: list[dict]) -> list[dict]:
            encoded = [s for batch in group for s in batch.get("encoded", ())]
            if not encoded:
                return group
            decoder = free.get()
            try:
                video, failures = decoder.decode(encoded)
                if video.is_cuda:  # ready before it leaves this thread, whatever stream the consumer uses
                    torch.cuda.current_stream(video.device).synchronize()
            finally:
                free.put(decoder)
                if backlog is not None:
                    backlog.done(len(encoded))
            return split_decoded(group, video, failures)

        pending: deque = deque()
        pool = ThreadPoolExecutor(self.dali.pipelines, thread_name_prefix="dali-decode")
        try:
            for group in batch_groups(batches, self.dali.batch):
                pending.append(pool.submit(decoded, group))
                if len(pending) > self.dali.pipelines:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:  # the consumer stopped early: drop what was prefetched (its position never counted)
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)

    def _decoders(self) -> list[DaliDecoder]:
        """Returns the DALI decoders, built once per loader (a DALI pipeline takes a while to build)."""
        while len(self._dali_decoders) < self.dali.pipelines:
            self._dali_decoders.append(DaliDecoder(dali_device(), max_batch=self.dali.batch,
                                                   threads=self.dali.threads))
        return self._dali_decoders[:self.dali.pipelines]

    def _device(self) -> torch.device:
        return self.device or handed_device()

    def _finished(self) -> bool:
        """True when every slot has done its epochs (iterating again then starts over)."""
        return all(s.get("done") for s in self._slots)

    # -------------------------------------------------------------------------------------------- position
    def stats(self) -> dict[str, int]:
        """Returns the skipped-sample counts by kind, summed over this rank's workers (consumed batches only)."""
        total = Counter(self._main_skips)
        for s in self._slots:
            total.update(s.get("skips", {}))
        damaged = sum(len(c.damaged) for c in self.spec.corpora)
        if damaged and self.rank == 0:  # a property of the corpus: counted once, not once per rank
            total["damaged_shards"] = damaged
        return dict(sorted(total.items()))

    def rank_state(self) -> dict:
        return {"rank": self.rank, "next_worker": self._next, "slots": [dict(s) for s in self._slots],
                "main_skips": dict(self._main_skips)}

    def state_dict(self, gather: bool = True) -> dict:
        """Returns the position. When torch.distributed is initialized (and `gather`), this is a collective call:
        every rank's position is gathered, so the state saved by any rank can resume any world size."""
        ranks = [self.rank_state()]
        if gather and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and self.spec.layout.world_size > 1:
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, self.rank_state())
        return {"version": STATE_VERSION, "layout": self.spec.layout.as_dict(),
                "corpora": [c.fingerprint() for c in self.spec.corpora],
                "exclusions": exclusions_to_state(self.spec.exclusions), "ranks": ranks}

    def load_state_dict(self, sd: dict) -> None:
        """Restores a position: exactly with the same layout, else with `relayout`'s bound (needs every rank's)."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {sd.get('version')!r} is not {STATE_VERSION}")
        fingerprints = [c.fingerprint() for c in self.spec.corpora]
        if sd["corpora"] != fingerprints:
            raise ValueError("data state was saved for other shards: data.train (shard names or counts) changed "
                             f"({sd['corpora']} vs {fingerprints})")
        old = Layout(**sd["layout"])
        new = self.spec.layout
        old_exclusions = exclusions_from_state(sd["exclusions"])
        if all(getattr(old, f) == getattr(new, f) for f in ORDER_FIELDS):
            mine = [r for r in sd["ranks"] if r["rank"] == self.rank]
            if not mine:
                raise ValueError(f"data state has no position for rank {self.rank}")
            self.spec.exclusions = old_exclusions
            self._slots = [dict(s) for s in mine[0]["slots"]]
            self._next = int(mine[0]["next_worker"])
            self._main_skips = Counter(mine[0]["main_skips"])
            return
        self._relayout(sd, old, old_exclusions)

    def _relayout(self, sd: dict, old: Layout, old_exclusions: list) -> None:
        ranks = sorted(sd["ranks"], key=lambda r: r["rank"])
        if [r["rank"] for r in ranks] != list(range(old.world_size)):
            raise ValueError(f"resuming {old.world_size} ranks x {old.slots_per_rank} workers as "
                             f"{self.spec.layout.world_size} x {self.spec.layout.slots_per_rank} needs every old "
                             "rank's position (a state_dict gathered over all ranks)")
        old_slots = [s.get("stream") or {"corpora": [[0, 0]] * len(self.spec.corpora)}
                     for r in ranks for s in r["slots"]]
        exclusions, starts = relayout(self.spec, old, old_exclusions, old_slots)
        self.spec.exclusions = exclusions
        self._slots = [{"stream": {"draws": 0, "corpora": [list(p) for p in starts]}, "skips": {}}
                       for _ in range(self.spec.layout.slots_per_rank)]
        self._next = 0
        carried: Counter = Counter()
        for r in ranks:
            if r["rank"] % self.spec.layout.world_size == self.rank:
                carried.update(r["main_skips"])
                for s in r["slots"]:
                    carried.update(s.get("skips", {}))
        self._main_skips = carried


# ------------------------------------------------------------------------------------------------------ building
def corpus_weights(corpora: list[Corpus], weights: Optional[list[float]]) -> list[float]:
    """Returns the mixing weights: the configured ones, or the corpora's sample counts (= concatenation)."""
    if weights is None:
        return [float(c.samples) for c in corpora]
    if len(weights) != len(corpora):
        raise ConfigError(f"data.weights has {len(weights)} entries for {len(corpora)} entries of data.train")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"data.weights must be non-negative with a positive sum, got {weights}")
    return [float(w) for w in weights]


def build_loader(data_cfg: DataConfig, batch_size: int, rank: int, world_size: int, seed: int,
                 train: bool = True, run_dir: Optional[str] = None,
                 device: Optional[torch.device] = None) -> StreamingLoader:
    """Returns the loader of this rank (see the module docstring and docs/CONTRACTS.md). With `run_dir`, the sample
    counts of URL-pattern corpora are read from it when an earlier start kept them there, else found (stats files,
    a parallel scan) and kept there by rank 0, so that a resume does not scan the tars again. `device`: where the
    CPU decoder's clips are handed out (the training device; default the current GPU where there is one)."""
    sources = split_sources(data_cfg.train)
    if not sources:
        raise ConfigError("data.train is empty: give a shard index.json or a brace URL pattern")
    known = known_counts(run_dir)
    corpora = [resolved_corpus(s, data_cfg.strict, known) for s in sources]
    if run_dir and rank == 0 and any(s not in known for s in sources if not s.endswith(".json")):
        keep_counts(run_dir, corpora)
    for c in corpora:
        if c.samples == 0:
            raise ConfigError(f"data.train: {c.source} has no samples")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    epochs = data_cfg.epochs if data_cfg.epochs is not None or train else 1
    layout = Layout(seed=seed, world_size=world_size, slots_per_rank=max(1, data_cfg.num_workers), shuffle=train,
                    buffer=data_cfg.shuffle_buffer, epochs=epochs)
    spec = StreamSpec(corpora, corpus_weights(corpora, data_cfg.weights), layout, per_batch=data_cfg.mix == "batch")
    planner = SamplePlanner(corpora, seed, data_cfg.num_frames, data_cfg.img_size, data_cfg.fps, train,
                            data_cfg.crop, data_cfg.normalize, image_frames=1 if data_cfg.mix == "batch" else None)
    decoder = resolved_decoder_name(data_cfg.decoder)
    return StreamingLoader(spec, rank, data_cfg.num_workers, batch_size, planner, decoder, device=device)
