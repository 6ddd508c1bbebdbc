"""Zero-shot text-video retrieval of a built model on UMT's protocol (docs/EVAL_PROTOCOL.md): the scoring
(retrieval.py), its report (report.py) and score matrices (scores.py), the benchmarks' settings and caption cleaning
(protocol.py), annotation readers, the video-text model protocol and its adapters (models.py), metrics and UMT's
re-ranking.

`pipeline.stages.retrieval` (`videomamba eval`) builds the model from a checkpoint and calls them; see
docs/CONTRACTS.md.
"""
