"""CUDA-graph generation for lincat models: see lincat/modeling/generation.py."""

from .modeling.generation import DecodeGraph, graph_generate, make_cache, positions_from_mask, sync_seen

__all__ = ["DecodeGraph", "graph_generate", "make_cache", "positions_from_mask", "sync_seen"]
