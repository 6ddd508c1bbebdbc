"""The official zero-shot test protocol of each benchmark (VideoMamba video_mm/exp_zs/<dataset>/config.py on UMT's
code) and UMT's caption cleaning.

What differs between the benchmarks is the text length (`max_txt_l`), whether a video's sentences are one paragraph
query (`is_paragraph_retrieval`) and whether only the first 30 seconds of a video are used (`trimmed30`, DiDeMo).
All five video benchmarks use 8 test frames sampled "middle", 224x224 frames and k_test 128; the image-text ones
(video_mm/configs/ret_coco.py, ret_flickr.py) one frame.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Benchmark:
    max_text_len: int  # tokens, [CLS] and [SEP] included (the tokenizer's max_length)
    paragraph: bool  # a video's sentences joined into one query
    trim_seconds: Optional[float]  # only the first this many seconds of each video are sampled
    num_frames: int = 8  # num_frames_test
    allow_missing: bool = False  # eval.allow_missing's default: a benchmark scored on part of its videos is not it


# exp_zs/{msrvtt,didemo,anet,lsmdc,msvd}/config.py: max_txt_l, is_paragraph_retrieval, trimmed30
BENCHMARKS = {
    "msrvtt": Benchmark(32, False, None),
    "didemo": Benchmark(64, True, 30.0),
    "anet": Benchmark(150, True, None),
    "lsmdc": Benchmark(96, False, None),
    "msvd": Benchmark(64, False, None),
    "synthetic": Benchmark(32, False, None, allow_missing=True),  # `videomamba synth`'s held-out set, like MSRVTT
    "coco": Benchmark(22, False, None, num_frames=1),  # configs/ret_coco.py
    "flickr": Benchmark(32, False, None, num_frames=1),  # configs/ret_flickr.py
}
DATASETS = tuple(BENCHMARKS)
K_TEST = 128  # exp_zs/*/config.py evaluation.k_test


def pre_text(text: str) -> str:
    """Returns a caption cleaned as UMT's `pre_text` (video_mm/dataset/utils.py) cleans every test caption:
    lowercased, the characters , . ' ! ? " ( ) * # : ; ~ removed, - and / turned into spaces, "<person>" into
    "person", runs of whitespace squeezed to one space, stripped."""
    text = re.sub(r"([,.'!?\"()*#:;~])", "", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text)
    return text.rstrip("\n").strip(" ")
