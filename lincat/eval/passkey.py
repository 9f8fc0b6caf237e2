"""Synthetic passkey retrieval: hide a number at a given depth of filler text and ask for it back.

Filler comes from a small grammar of our own, so it is varied but carries no information. Exact match on the first
number the model generates. Linearized models are known to be weakest here once the needle leaves their window."""

import random
import re

import torch

SUBJECTS = ["The old bridge", "A quiet river", "The morning train", "Our garden", "The village bell", "A grey cloud",
            "The market square", "An open window", "The harbour light", "A paper kite"]
PREDICATES = ["stood still for a while.", "moved slowly past the hill.", "was there as it always is.",
              "looked the same as yesterday.", "made no sound at all.", "waited for the evening.",
              "seemed calm and ordinary.", "changed very little over the years."]
QUESTION = "\nWhat is the secret number? The secret number is"


def filler(rng: random.Random, n_sentences: int) -> str:
    return " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)}" for _ in range(n_sentences))


def make_prompt(tokenizer, length: int, depth: float, rng: random.Random) -> tuple[torch.Tensor, str]:
    """Token ids of about `length` tokens with the needle at `depth` (0 = start, 1 = end), and the key."""
    key = str(rng.randrange(10_000, 100_000))
    needle = f" The secret number is {key}. Remember it: {key}. "
    intro = "There is a secret number hidden in the text below. Remember it.\n"
    fixed = len(tokenizer(intro + needle + QUESTION, add_special_tokens=False)["input_ids"])
    per_sentence = max(len(tokenizer(filler(rng, 20), add_special_tokens=False)["input_ids"]) / 20, 1)
    n = max(int((length - fixed) / per_sentence), 0)
    before = int(n * depth)
    text = intro + filler(rng, before) + needle + filler(rng, n - before) + QUESTION
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return torch.tensor(bos + tokenizer(text, add_special_tokens=False)["input_ids"]), key


@torch.no_grad()
def passkey_accuracy(model, tokenizer, lengths, depths=(0.1, 0.5, 0.9), trials: int = 4, seed: int = 0,
                     new_tokens: int = 8) -> dict:
    """{length: accuracy} over depths x trials, greedy decoding."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {}
    for length in lengths:
        hits = total = 0
        for depth in depths:
            for _ in range(trials):
                ids, key = make_prompt(tokenizer, length, depth, rng)
                gen = model.generate(ids[None].to(device), attention_mask=torch.ones_like(ids)[None].to(device),
                                     max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
                answer = tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True)
                found = re.search(r"\d+", answer)
                hits += bool(found and found.group() == key)
                total += 1
        out[int(length)] = hits / total
    return out
