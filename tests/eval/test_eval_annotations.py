"""Retrieval annotations: UMT's JSON (video and image keys), JSON Lines, CLIP4Clip's MSRVTT csv and data.json; one
caption, many captions, paragraphs; UMT's caption cleaning; the benchmark from the name; errors name file and entry."""
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
    assert ann.texts == ["a man walks in he sits down", "already one paragraph"] and ann.text_video == [0, 1]


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
    ({"videos": "a.mp4"}, r"ann.json: got an object with keys 'videos'; expected UMT's JSON list"),
    (3, r"ann.json: got int; expected UMT's JSON list"),
    ([{"video": "a.mp4", "caption": "x"}, {"video": "b.mp4"}], r"ann.json: entry 1: missing field 'caption'"),
    ([{"caption": "x"}], r"ann.json: entry 0: missing field 'video' \(or 'image'\)"),
    ([{"video": "a.mp4", "caption": "x"}, {"image": "b.jpg", "caption": "y"}], r"entry 1: an 'image' entry among"),
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
    with pytest.raises(ConfigError, match="broken.json: not valid JSON .*; expected UMT's JSON list"):
        read_annotations(str(tmp_path / "broken.json"), "msrvtt")
    with pytest.raises(ConfigError, match="unknown dataset 'kinetics'"):
        read_annotations(write(tmp_path, [{"video": "a", "caption": "b"}]), "kinetics")


def test_captions_are_cleaned_as_umts_pre_text(tmp_path):
    ann = read_annotations(write(tmp_path, [{"video": "a.mp4", "caption": "A Man's  (big) dog-walk; 'fun'/joy!  "},
                                            {"video": "b.mp4", "caption": "<person> waves."}]), "lsmdc")
    assert ann.texts == ["a mans big dog walk fun joy", "person waves"]


def test_image_key_is_an_image_set(tmp_path):
    ann = read_annotations(write(tmp_path, [{"image": "val2014/1.jpg", "caption": ["A cat.", "A pet"]}],
                                 "coco_test.json"))
    assert (ann.media, ann.dataset, ann.videos, ann.texts) == ("image", "coco", ["val2014/1.jpg"], ["a cat", "a pet"])


def test_json_lines(tmp_path):
    path = tmp_path / "msvd_test.jsonl"
    path.write_text('{"video": "a.avi", "caption": ["one", "two"]}\n\n{"video": "b.avi", "caption": "three"}\n')
    ann = read_annotations(str(path))
    assert (ann.format, ann.dataset, ann.videos, ann.texts, ann.text_video) == \
        ("jsonl", "msvd", ["a.avi", "b.avi"], ["one", "two", "three"], [0, 0, 1])
    path.write_text('{"video": "a.avi", "caption": "one"}\n{"video": \n')
    with pytest.raises(ConfigError, match=r"msvd_test.jsonl: line 2: not valid JSON"):
        read_annotations(str(path))


def test_clip4clip_jsfusion_csv_is_msrvtt_1k(tmp_path):
    path = tmp_path / "MSRVTT_JSFUSION_test.csv"
    path.write_text("key,vid_key,video_id,sentence\nret0,msr7579,video7579,a girl wearing red top.\n"
                    "ret1,msr7725,video7725,young people sit around the edges of a room clapping\n")
    ann = read_annotations(str(path))
    assert (ann.format, ann.dataset, ann.videos) == ("clip4clip-csv", "msrvtt", ["video7579.mp4", "video7725.mp4"])
    assert ann.texts == ["a girl wearing red top", "young people sit around the edges of a room clapping"]


def test_clip4clip_msrvtt_data_json_is_the_test_split_with_every_sentence(tmp_path):
    data = {"info": {}, "videos": [{"video_id": "video0", "split": "train", "id": 0},
                                   {"video_id": "video7010", "split": "test", "id": 7010},
                                   {"video_id": "video7011", "split": "test", "id": 7011}],
            "sentences": [{"caption": "train text", "video_id": "video0", "sen_id": 0},
                          {"caption": "first test", "video_id": "video7010", "sen_id": 1},
                          {"caption": "second", "video_id": "video7011", "sen_id": 2},
                          {"caption": "third", "video_id": "video7010", "sen_id": 3}]}
    ann = read_annotations(write(tmp_path, data, "MSRVTT_data.json"))
    assert (ann.format, ann.dataset, ann.videos) == ("clip4clip-data-json", "msrvtt", ["video7010.mp4", "video7011.mp4"])
    assert ann.texts == ["first test", "third", "second"] and ann.text_video == [0, 0, 1]


def test_the_benchmark_comes_from_the_name_or_is_asked_for(tmp_path):
    entry = [{"video": "a.mp4", "caption": ["one.", "two."]}]
    assert read_annotations(write(tmp_path, entry, "didemo_ret_test.json")).texts == ["one two"]
    assert read_annotations(write(tmp_path, entry, "anet_ret_val.json")).dataset == "anet"
    assert read_annotations(write(tmp_path, entry, "msrvtt_ret_test1k.json")).texts == ["one", "two"]
    with pytest.raises(ConfigError, match=r"test.json: cannot tell which benchmark .* --dataset msrvtt\|didemo"):
        read_annotations(write(tmp_path, entry, "test.json"))
    assert read_annotations(write(tmp_path, entry, "test.json"), "anet").texts == ["one two"]


def test_a_file_of_no_known_format_is_refused_in_one_line(tmp_path):
    path = tmp_path / "msrvtt.txt"
    path.write_text("video7579 a girl wearing red top\n")
    with pytest.raises(ConfigError) as e:
        read_annotations(str(path))
    message = str(e.value)
    assert "\n" not in message and "MSRVTT_JSFUSION_test.csv" in message and "JSON Lines" in message
