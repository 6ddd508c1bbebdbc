"""The sample streams without decoding: shard assignment, shuffling, mixing, positions and re-layout."""
from __future__ import annotations

import collections
import itertools

import numpy as np

from pipeline.data.stream import (Layout, SlotStream, StreamSpec, emission_order, exclusions_from_state,
                                  exclusions_to_state, relayout, resolved_corpus, split_sources)

from data_shard_files import tar_bytes


def text_corpus(root, name: str, shards: int, per_shard: int):
    """Writes tars of caption-only samples (the stream never looks inside) and returns the resolved corpus."""
    root.mkdir(exist_ok=True)
    for s in range(shards):
        samples = [(f"{name}{s * per_shard + j:04d}", {"txt": b"x"}) for j in range(per_shard)]
        (root / f"{name}-{s:06d}.tar").write_bytes(tar_bytes(samples))
    return resolved_corpus(str(root / f"{name}-{{000000..{shards - 1:06d}}}.tar"))


def layout(world: int, workers: int = 1, epochs=None, buffer: int = 8, seed: int = 0) -> Layout:
    return Layout(seed=seed, world_size=world, slots_per_rank=workers, shuffle=True, buffer=buffer, epochs=epochs)


def test_brace_patterns_keep_their_commas():
    assert split_sources("a/{x,y}-{0..3}.tar, b/index.json") == ["a/{x,y}-{0..3}.tar", "b/index.json"]


def test_shuffle_buffer_is_a_permutation_that_stays_within_the_buffer():
    order = emission_order(500, layout(1, buffer=16), corpus=0, epoch=3, slot=0)
    assert sorted(order.tolist()) == list(range(500)) and order.tolist() != list(range(500))
    assert all(order[j] <= j + 15 for j in range(500))  # never more than a buffer ahead of the reader


def test_fewer_shards_than_slots_are_split_so_every_slot_reads(tmp_path):
    corpus = text_corpus(tmp_path / "c", "c", shards=2, per_shard=9)
    spec = StreamSpec([corpus], [1.0], layout(world=3, workers=2, epochs=1))
    per_slot = [[s.key for s in SlotStream(spec, slot)] for slot in range(6)]
    assert all(len(keys) == 3 for keys in per_slot)
    assert sorted(itertools.chain(*per_slot)) == [f"c{i:04d}" for i in range(18)]


def test_slots_left_without_a_unit_end_at_once_in_an_endless_stream(tmp_path):
    corpus = text_corpus(tmp_path / "c", "c", shards=1, per_shard=2)  # two one-sample units for three slots
    spec = StreamSpec([corpus], [1.0], layout(world=1, workers=3))
    assert list(SlotStream(spec, 2)) == []
    firsts = [list(itertools.islice(SlotStream(spec, slot), 4)) for slot in (0, 1)]
    for epoch in range(4):
        assert sorted(samples[epoch].key for samples in firsts) == ["c0000", "c0001"]


def test_epochs_reshuffle_and_each_covers_everything(tmp_path):
    corpus = text_corpus(tmp_path / "c", "c", shards=4, per_shard=6)
    spec = StreamSpec([corpus], [1.0], layout(world=1, workers=2, epochs=2))
    epochs = collections.defaultdict(list)
    for slot in range(2):
        for s in SlotStream(spec, slot):
            epochs[s.epoch].append(s.key)
    assert sorted(epochs[0]) == sorted(epochs[1]) == [f"c{i:04d}" for i in range(24)]
    assert epochs[0] != epochs[1]


def test_mixing_follows_the_weights(tmp_path):
    a = text_corpus(tmp_path / "a", "a", shards=2, per_shard=40)
    b = text_corpus(tmp_path / "b", "b", shards=2, per_shard=40)
    spec = StreamSpec([a, b], [3.0, 1.0], layout(world=1, workers=1))
    keys = [s.key for s in itertools.islice(SlotStream(spec, 0), 2000)]
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(share - 0.75) < 0.04  # binomial sd is 0.01
    assert len(set(keys[:80])) == 80  # endless: each corpus cycles through its epochs


def test_a_restored_position_continues_exactly(tmp_path):
    a = text_corpus(tmp_path / "a", "a", shards=3, per_shard=7)
    b = text_corpus(tmp_path / "b", "b", shards=2, per_shard=5)
    spec = StreamSpec([a, b], [1.0, 1.0], layout(world=2, workers=2, buffer=5))
    straight = [(s.key, s.epoch) for s in itertools.islice(SlotStream(spec, 3), 60)]
    head_stream = SlotStream(spec, 3)
    head = [(s.key, s.epoch) for s in itertools.islice(head_stream, 23)]
    resumed = SlotStream(spec, 3, head_stream.state())
    tail = [(s.key, s.epoch) for s in itertools.islice(resumed, 37)]
    assert head + tail == straight


def test_relayout_leaves_out_exactly_what_the_old_slots_emitted(tmp_path):
    corpus = text_corpus(tmp_path / "c", "c", shards=4, per_shard=10)
    old = StreamSpec([corpus], [1.0], layout(world=2, seed=4))
    seen = collections.defaultdict(list)  # epoch -> keys
    states = []
    for slot, count in ((0, 30), (1, 5)):  # slot 0 is 10 samples into its second epoch, slot 1 still in its first
        stream = SlotStream(old, slot)
        for s in itertools.islice(stream, count):
            seen[s.epoch].append(s.key)
        states.append(stream.state())
    new_layout = layout(world=3, seed=4, buffer=3)
    exclusions, starts = relayout(StreamSpec([corpus], [1.0], new_layout), old.layout, [], states)
    assert starts == [[0, 0]]
    exclusions = exclusions_from_state(exclusions_to_state(exclusions))  # survives the state dict
    new = StreamSpec([corpus], [1.0], new_layout, exclusions)
    for slot in range(3):
        for s in SlotStream(new, slot, {"corpora": starts}):
            if s.epoch >= 2:
                break
            seen[s.epoch].append(s.key)
    everything = [f"c{i:04d}" for i in range(40)]
    assert sorted(seen[0]) == everything and sorted(seen[1]) == everything


def test_positions_depend_on_the_seed(tmp_path):
    corpus = text_corpus(tmp_path / "c", "c", shards=2, per_shard=10)
    orders = [[s.key for s in SlotStream(StreamSpec([corpus], [1.0], layout(1, epochs=1, seed=k)), 0)]
              for k in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2]
    assert np.array_equal(sorted(orders[2]), sorted(orders[0]))


def batches_of(stream: SlotStream, batch: int, count: int) -> list[list[str]]:
    """The first `count` batches a reader of `batch` samples takes from a per-batch stream (ending each batch)."""
    out, samples = [], iter(stream)
    for _ in range(count):
        out.append([next(samples).key for _ in range(batch)])
        stream.end_batch()
    return out


def test_per_batch_mixing_keeps_each_batch_to_one_corpus_by_weight(tmp_path):
    """data.mix=batch (the official MetaLoader): each batch comes whole from one corpus, the corpora's shares of
    batches follow the weights, and the same step draws the same corpus on every rank."""
    a = text_corpus(tmp_path / "a", "a", shards=2, per_shard=40)
    b = text_corpus(tmp_path / "b", "b", shards=2, per_shard=40)
    spec = StreamSpec([a, b], [3.0, 1.0], layout(world=2, workers=2), per_batch=True)
    batches = batches_of(SlotStream(spec, 0), 4, 600)
    assert all(len({k[0] for k in keys}) == 1 for keys in batches)
    share = sum(keys[0].startswith("a") for keys in batches) / len(batches)
    assert abs(share - 0.75) < 0.06  # binomial sd is 0.018
    # slot 2 is rank 1's worker 0, as slot 0 is rank 0's: the same corpus at every one of their batches
    rank1 = batches_of(SlotStream(spec, 2), 4, 600)
    assert [keys[0][0] for keys in rank1] == [keys[0][0] for keys in batches]
    assert rank1 != batches  # other samples, as every rank reads its own
    worker1 = batches_of(SlotStream(spec, 1), 4, 600)  # the rank's other worker: its steps, its own draws
    assert [keys[0][0] for keys in worker1] != [keys[0][0] for keys in batches]
    mixed = [s.key for s in itertools.islice(SlotStream(StreamSpec([a, b], [3.0, 1.0], layout(2, 2)), 0), 400)]
    assert any(len({k[0] for k in mixed[i:i + 4]}) == 2 for i in range(0, 400, 4))  # per sample: batches mix


def test_per_batch_position_restored_mid_batch_or_between_batches_continues_exactly(tmp_path):
    a = text_corpus(tmp_path / "a", "a", shards=3, per_shard=7)
    b = text_corpus(tmp_path / "b", "b", shards=2, per_shard=5)
    spec = StreamSpec([a, b], [1.0, 1.0], layout(world=1, workers=1, buffer=5), per_batch=True)
    straight = batches_of(SlotStream(spec, 0), 3, 20)
    head_stream = SlotStream(spec, 0)
    head = batches_of(head_stream, 3, 7)
    resumed = SlotStream(spec, 0, head_stream.state())
    assert head + batches_of(resumed, 3, 13) == straight
    partial = SlotStream(spec, 0)  # two samples into batch 1: the held corpus is part of the position
    samples = iter(partial)
    first = [next(samples).key for _ in range(3)]
    partial.end_batch()
    started = [next(samples).key for _ in range(2)]
    assert "held" in partial.state()
    rest = SlotStream(spec, 0, partial.state())
    assert [first, started + [next(iter(rest)).key]] == straight[:2]


def test_a_corpus_that_runs_out_inside_a_batch_hands_the_rest_to_a_new_draw(tmp_path):
    a = text_corpus(tmp_path / "a", "a", shards=1, per_shard=5)
    b = text_corpus(tmp_path / "b", "b", shards=1, per_shard=40)
    spec = StreamSpec([a, b], [1.0, 1.0], layout(world=1, workers=1, epochs=1), per_batch=True)
    keys = [s.key for s in SlotStream(spec, 0)]  # never told of a batch's end: one draw, then the rest
    assert sorted(keys) == sorted([f"a{i:04d}" for i in range(5)] + [f"b{i:04d}" for i in range(40)])
