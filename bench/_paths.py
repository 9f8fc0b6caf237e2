"""Imported first by every script run as `python bench/<script>.py`: puts the repository root on sys.path and takes
bench/ off it, since bench/kernels.py would otherwise stand in for Hugging Face's `kernels` package when
transformers imports that (and, as bench/kernels.py does for itself, stub out lincat)."""

import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != BENCH]
sys.path.insert(0, REPO)
