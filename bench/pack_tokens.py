"""Pre-tokenize a text corpus into a uint16 .npy token stream (BOS + document + EOS, documents in file order), the
form `data.source=*.npy` reads. The device has no `datasets` and carries at most 64 MiB, so the quality benchmark
ships the corpus this way (xz-compressed: 9.7M lincat-ref tokens are 8 MB).

    python bench/pack_tokens.py ../shared/models/lincat-ref ../shared/data/corpus/train .carry/train.npy
    python bench/pack_tokens.py ../shared/models/stories260K ../shared/data/corpus/train .carry/stories_train.npy \
        --max-tokens 4000000
"""

import argparse
import sys

import _paths  # noqa: F401  (repository root on sys.path, bench/ off it)
import numpy as np
from transformers import AutoTokenizer

from lincat.eval.ppl import read_documents  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizer")
    ap.add_argument("text", help="a text file or a folder of them")
    ap.add_argument("out")
    ap.add_argument("--max-tokens", type=int, default=0, help="stop after the document that crosses this count")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.vocab_size > 65535:
        sys.exit(f"vocabulary of {tok.vocab_size} does not fit uint16")
    ids: list[int] = []
    for doc in read_documents(args.text):
        ids += [tok.bos_token_id, *tok(doc, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        if args.max_tokens and len(ids) > args.max_tokens:
            break
    np.save(args.out, np.array(ids, dtype=np.uint16))
    print(f"{len(ids)} tokens -> {args.out}")


if __name__ == "__main__":
    main()
