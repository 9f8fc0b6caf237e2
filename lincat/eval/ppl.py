"""Perplexity with a strided evaluation: each window of `context` tokens scores only the tokens the previous window
did not, so long documents are scored with up to `context` tokens of real preceding context."""

import json
import math
from pathlib import Path

import torch

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


def read_documents(source) -> list[str]:
    """Documents from a .txt file (one document), a .jsonl/.json file (its text-like field per record) or a folder."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"evaluation data {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    docs = []
    for f in files:
        if f.suffix == ".txt":
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
            continue
        lines = f.read_text().splitlines() if f.suffix == ".jsonl" else [json.dumps(r) for r in json.loads(f.read_text())]
        for line in lines:
            rec = json.loads(line) if line.strip() else {}
            text = rec.get("text") or rec.get("page") or rec.get("content")
            if text:
                docs.append(text)
    if not docs:
        raise ValueError(f"no text found in {path}")
    return docs


def tokenize_documents(docs: list[str], tokenizer) -> list[torch.Tensor]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [torch.tensor(bos + tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs]


@torch.no_grad()
def strided_ppl(model, docs: list[torch.Tensor], context: int, max_tokens: int = 65536, stride: int | None = None) -> dict:
    """Perplexity over the first `max_tokens` scored tokens of `docs` with windows of `context` tokens."""
    stride = stride or max(context // 2, 1)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for ids in docs:
        prev_end = 0
        for begin in range(0, max(len(ids) - 1, 1), stride):
            end = min(begin + context, len(ids))
            window = ids[begin:end].to(device)[None]
            new = end - max(prev_end, begin + 1)  # tokens not scored yet (the first token of a doc has no target)
            if new > 0:
                logits = model(window, use_cache=False).logits[0, -new - 1:-1].float()
                nll += torch.nn.functional.cross_entropy(logits, window[0, -new:], reduction="sum").item()
                count += new
            prev_end = end
            if end == len(ids) or count >= max_tokens:
                break
        if count >= max_tokens:
            break
    return {"ppl": math.exp(nll / max(count, 1)), "tokens": count}
