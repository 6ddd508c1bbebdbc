"""Corpus -> WebDataset shards (manifest readers, Ray writer tasks, shard index, synthetic corpus)."""
