"""Discrepancy math, the batched extractor and the feature store."""
