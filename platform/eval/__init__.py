"""Panoptic quality (PQ, SQ, RQ) with panopticapi's semantics, in memory and from files."""
