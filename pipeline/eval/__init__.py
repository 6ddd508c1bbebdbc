"""Zero-shot text-video retrieval: annotation readers, the video-text model seam, metrics and re-ranking.

`pipeline.stages.retrieval` (`videomamba eval`) puts them together; see docs/CONTRACTS.md.
"""
