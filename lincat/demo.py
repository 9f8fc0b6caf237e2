"""`lincat demo`: the whole pipeline offline on a CPU in a few minutes.

1. Write a synthetic corpus whose text needs attention: key=value facts recalled later (associative recall, at
   distances inside and beyond the 64-token window), copying, and a small grammar for local structure.
2. Build a character tokenizer and a tiny Llama teacher, and pretrain it on the corpus.
3. Convert the teacher with the lolcats recipe through the real `lincat convert` pipeline (stage 1, stage 2, export).
4. Compare teacher and student: held-out perplexity and recall accuracy.
"""

import json
import math
import random
import string
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
NOUNS = "cat dog bird fox owl frog mouse horse ship tree river stone lamp door".split()
ADJS = "small red old quiet bright cold green happy dark tall".split()
VERBS = "sees finds follows likes hears paints carries meets".split()


def sentence(rng: random.Random) -> str:
    return f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} ."


def document(rng: random.Random) -> tuple[str, list[tuple[int, int, str]]]:
    """A document and its recall queries as (answer position, distance in characters back to the nearest earlier
    `k=v` of the same key, answer).

    Facts are `k=v` (one letter, one digit); a later query repeats `k=` and must be completed with `v`, an induction
    pattern that small models learn quickly. Grammar sentences and copy tasks sit in between, so facts end up at
    distances both inside and beyond the 64-token window (characters are tokens here).
    """
    keys = rng.sample(string.ascii_lowercase, 8)
    facts = {k: str(rng.randrange(10)) for k in keys}
    text, seen, queries = "", {}, []
    for step in range(14):
        r = rng.random()
        if (r < 0.3 or not seen) and len(seen) < len(keys):
            k = keys[len(seen)]
            seen[k] = len(text)
            text += f"{k}={facts[k]} . "
        elif r < 0.5:
            text += sentence(rng) + " "
        elif r < 0.6:
            word = "".join(rng.choices(string.ascii_lowercase, k=5))
            text += f"copy {word} {word} . "
        else:
            k = rng.choice(list(seen))
            at = len(text)
            text += f"{k}="
            queries.append((len(text), len(text) - seen[k], facts[k]))
            text += f"{facts[k]} . "
            seen[k] = at  # the answer now also sits here: distances count from the nearest earlier copy
    return text, queries


def corpus(n: int, seed: int) -> tuple[list[str], list[list]]:
    rng = random.Random(seed)
    docs = [document(rng) for _ in range(n)]
    return [d for d, _ in docs], [q for _, q in docs]


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_lowercase + string.digits + " .=->:\n"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    from tokenizers import decoders

    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def pretrain_teacher(tokenizer, texts: list[str], seconds: float, max_steps: int = 800, seq_len: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Two layers are the fewest that form induction heads (recall), and train twice as fast as four: on 2 CPU cores
    # recall appears after ~500-700 steps (~80 s).
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor([t for x in texts for t in [1] + tokenizer(x, add_special_tokens=False)["input_ids"] + [2]])
    blocks = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    t0, step = time.time(), 0
    with console.status("pretraining the teacher") as status:
        while step < max_steps and time.time() - t0 < seconds:
            lr = 3e-3 * min(1.0, (step + 1) / 50)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = blocks[torch.randint(len(blocks), (16,), generator=g)]
            loss = model(batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            step += 1
            if step % 20 == 0:
                status.update(f"pretraining the teacher: step {step}, loss {loss.item():.3f}")
    console.print(f"teacher: {step} steps in {time.time() - t0:.0f}s, final loss {loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def score(model, tokenizer, texts, queries, window: int) -> dict:
    """Perplexity over the texts and exact-match recall of each query's two answer digits (teacher-forced)."""
    nll, count, hits = 0.0, 0, {"near": [0, 0], "far": [0, 0]}
    for text, qs in zip(texts, queries):
        ids = torch.tensor([[1] + tokenizer(text, add_special_tokens=False)["input_ids"]])
        logits = model(ids).logits[0]
        nll += torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
        pred = logits.argmax(-1)
        for start, dist, ans in qs:
            pos = start + 1  # +1 for BOS; characters are tokens
            ok = all(pred[pos - 1 + i].item() == ids[0, pos + i].item() for i in range(len(ans)))
            bucket = hits["near" if dist < window else "far"]
            bucket[0] += ok
            bucket[1] += 1
    return {"ppl": math.exp(nll / count),
            **{f"recall_{k}": v[0] / max(v[1], 1) for k, v in hits.items()},
            **{f"n_{k}": v[1] for k, v in hits.items()}}


def run_demo(out: Path = Path("lincat-demo"), seconds: float = 150.0):
    from transformers import AutoModelForCausalLM

    from .export import load
    from .pipeline import run

    t0 = time.time()
    out = Path(out)
    if (out / "student" / "config.json").exists():
        console.print(f"[yellow]{out} already holds a finished demo; remove it to run again[/yellow]")
        return
    out.mkdir(parents=True, exist_ok=True)
    train_texts, _ = corpus(3000, seed=1)
    test_texts, test_queries = corpus(40, seed=2)
    data_dir = out / "corpus"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "train.txt").write_text("\n\n".join(train_texts))
    tokenizer = char_tokenizer()
    teacher_dir = out / "teacher"
    if not (teacher_dir / "config.json").exists():
        teacher = pretrain_teacher(tokenizer, train_texts, seconds * 0.7)
        teacher.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()

    budget = max(10, int(seconds * 0.27))  # steps per stage, scaled to the time budget
    overrides = ["data.seq_len=256", "data.val_sequences=8", "stage1.grad_accum=2", "stage2.grad_accum=2",
                 f"stage1.max_steps={budget}", f"stage2.max_steps={budget}", "stage2.lr=1e-3",
                 f"stage1.eval_every={budget // 2}", f"stage2.eval_every={budget // 2}", "runtime.log_every=10"]
    run(str(teacher_dir), "lolcats", str(data_dir / "train.txt"), str(out / "student"), overrides,
        resume=(out / "student" / "recipe.yaml").exists())
    student = load(out / "student", dtype=torch.float32).eval()

    window = student.config.lincat["layers"][0]["window"]
    results = {"teacher": score(teacher, tokenizer, test_texts, test_queries, window),
               "student (lolcats)": score(student, tokenizer, test_texts, test_queries, window)}
    table = Table(title=f"lincat demo: teacher vs lolcats student (window {window} tokens)")
    for col in ("model", "held-out ppl", f"recall < {window} tokens back", f"recall >= {window} back"):
        table.add_column(col)
    for name, r in results.items():
        table.add_row(name, f"{r['ppl']:.3f}", f"{r['recall_near']:.0%} of {r['n_near']}",
                      f"{r['recall_far']:.0%} of {r['n_far']}")
    Console().print(table)
    (out / "demo.json").write_text(json.dumps({**results, "seconds": time.time() - t0}, indent=1))
    console.print(f"saved: {out}/teacher, {out}/student (loads with trust_remote_code=True), {out}/demo.json "
                  f"({time.time() - t0:.0f}s)")
