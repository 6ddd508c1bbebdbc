"""Zero-shot text-video retrieval of a built model: the scoring (retrieval.py), its report (report.py), annotation
readers, the video-text model protocol and its adapters (models.py), metrics and re-ranking.

`pipeline.stages.retrieval` (`videomamba eval`) builds the model from a checkpoint and calls them; see
docs/CONTRACTS.md.
"""
