"""The self-contained part of lincat: everything needed to *run* a converted model.

It imports only torch, transformers, optionally triton, and its own files by relative import, because
`lincat export` copies these files next to the weights for `trust_remote_code=True` loading.
"""
