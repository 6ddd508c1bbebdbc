"""Retrieval annotations in UMT's JSON formats: one caption, many captions, paragraphs; errors name file and entry."""
import json

import fsspec
import pytest

from pipeline.config import ConfigError
from pipeline.eval.annotations import read_annotations


def write(tmp_path, entries, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return str(path)


def test_msrvtt_one_caption_per_video(tmp_path):
    ann = read_annotations(write(tmp_path, [{"video": "a.mp4", "caption": "a red circle", "duration": 3.0},
                                            {"video": "b.mp4", "caption": "a blue square"}]), "msrvtt")
    assert ann.videos == ["a.mp4", "b.mp4"]
    assert ann.texts == ["a red circle", "a blue square"] and ann.text_video == [0, 1]


def test_msvd_every_caption_is_a_query_and_repeated_videos_are_one_video(tmp_path):
    ann = read_annotations(write(tmp_path, [{"video": "a.mp4", "caption": ["one", "two"]},
                                            {"video": "b.mp4", "caption": ["three"]},
                                            {"video": "a.mp4", "caption": "four"}]), "msvd")
    assert ann.videos == ["a.mp4", "b.mp4"]
    assert ann.texts == ["one", "two", "three", "four"] and ann.text_video == [0, 0, 1, 0]


@pytest.mark.parametrize("dataset", ["didemo", "anet"])
def test_paragraph_datasets_join_a_videos_sentences(tmp_path, dataset):
    ann = read_annotations(write(tmp_path, [{"video": "a.mp4", "caption": ["a man walks in.", "he sits down."]},
                                            {"video": "b.mp4", "caption": "already one paragraph."}]), dataset)
    assert ann.texts == ["a man walks in. he sits down.", "already one paragraph."] and ann.text_video == [0, 1]


def test_any_fsspec_url_is_read():
    with fsspec.open("memory://ann/lsmdc_test.json", "w") as f:
        json.dump([{"video": "clip.avi", "caption": "someone opens a door"}], f)
    ann = read_annotations("memory://ann/lsmdc_test.json", "lsmdc")
    assert ann.videos == ["clip.avi"] and ann.texts == ["someone opens a door"]


def test_the_synthetic_corpus_files_are_read(synth_corpus):
    msrvtt = read_annotations(str(synth_corpus / "eval" / "msrvtt_test.json"), "synthetic")
    msvd = read_annotations(str(synth_corpus / "eval" / "msvd_test.json"), "msvd")
    assert len(msrvtt.videos) == len(msvd.videos) == 8 and msrvtt.videos == msvd.videos
    assert len(msrvtt.texts) == 8 and len(msvd.texts) > 8
    assert all((synth_corpus / "eval" / "videos" / v).exists() for v in msrvtt.videos)


@pytest.mark.parametrize("content,message", [
    ({"video": "a.mp4"}, r"ann.json: expected a JSON list"),
    ([{"video": "a.mp4", "caption": "x"}, {"video": "b.mp4"}], r"ann.json: entry 1: missing field 'caption'"),
    ([{"caption": "x"}], r"ann.json: entry 0: missing field 'video'"),
    ([{"video": 7, "caption": "x"}], r"ann.json: entry 0: \"video\" must be a non-empty file name, got 7"),
    ([{"video": "a.mp4", "caption": 3}], r"ann.json: entry 0 \(a.mp4\): \"caption\" must be a non-empty string"),
    ([{"video": "a.mp4", "caption": []}], r"entry 0 \(a.mp4\): \"caption\" must be"),
    ([{"video": "a.mp4", "caption": ["ok", None]}], r"entry 0 \(a.mp4\): \"caption\" must be"),
    (["a.mp4"], r"entry 0: expected an object"),
    ([], r"ann.json: no entries"),
])
def test_bad_annotations_name_the_file_and_the_entry(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        read_annotations(write(tmp_path, content), "msrvtt")


def test_missing_file_not_json_and_unknown_dataset(tmp_path):
    with pytest.raises(ConfigError, match="annotations file not found: .*nope.json"):
        read_annotations(str(tmp_path / "nope.json"), "msrvtt")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        read_annotations(str(tmp_path / "broken.json"), "msrvtt")
    with pytest.raises(ConfigError, match="unknown dataset 'kinetics'"):
        read_annotations(write(tmp_path, [{"video": "a", "caption": "b"}]), "kinetics")
