"""Training data through `datasets`: load a Hub dataset or local files, apply the Alpaca template to instruction
records, tokenize, pack into fixed-length sequences and hold out a validation split. Seeded and deterministic."""

from dataclasses import dataclass
from pathlib import Path

import torch

from ..recipe import DataConfig

LOCAL_TYPES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # and .npy token streams

# The Stanford Alpaca prompt format, which the LoLCATs and Liger recipes train on.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
TEXT_PIECE = 100_000  # long text files are split at paragraph breaks into pieces of about this many characters


class DataError(ValueError):
    """The data source is missing, unreadable, empty or too small; the message says what to do."""


@dataclass
class PackedData:
    train: torch.Tensor  # [N, seq_len] token ids
    val: torch.Tensor  # [M, seq_len]
    source: str
    documents: int

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def alpaca(record: dict) -> str:
    fields = {k: (record.get(k) or "").strip() for k in ("instruction", "input", "output")}
    return (ALPACA_WITH_INPUT if fields["input"] else ALPACA_NO_INPUT).format(**fields)


def local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_TYPES)
        if not files:
            raise DataError(f"data folder {path} has no {', '.join(LOCAL_TYPES)} files")
    else:
        return []
    bad = [p.name for p in files if p.suffix not in LOCAL_TYPES]
    if bad:
        raise DataError(f"unsupported data file {bad[0]}: use {', '.join(LOCAL_TYPES)} files")
    return files


def looks_local(source: str) -> bool:
    """A path-like source that does not exist is a user error, not a Hub dataset name."""
    return source.startswith((".", "/", "~")) or Path(source).suffix in LOCAL_TYPES


def _split_text(text: str) -> list[str]:
    """Long documents become ~TEXT_PIECE-character pieces cut at paragraph breaks, so tokenization parallelizes."""
    pieces, start = [], 0
    while start < len(text):
        end = start + TEXT_PIECE
        if end < len(text):
            cut = text.rfind("\n\n", start + TEXT_PIECE // 2, end)
            end = cut + 2 if cut > 0 else end
        pieces.append(text[start:end])
        start = end
    return pieces


def load_records(cfg: DataConfig):
    """A `datasets.Dataset` with one "text" column."""
    import datasets

    datasets.disable_progress_bars()  # lincat shows its own progress; per-map bars only add noise

    files = local_files(cfg.source)
    if files:
        kinds = {LOCAL_TYPES[p.suffix] for p in files}
        parts = []
        for kind in sorted(kinds):
            group = [str(p) for p in files if LOCAL_TYPES[p.suffix] == kind]
            if kind == "text":
                texts = [piece for p in group for piece in _split_text(Path(p).read_text(encoding="utf-8", errors="replace"))]
                parts.append(datasets.Dataset.from_dict({"text": texts}))
            else:
                ds = datasets.load_dataset(kind, data_files=group, split="train")
                parts.append(_to_text(ds, cfg))
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if looks_local(cfg.source):
        raise DataError(f"data path {cfg.source} does not exist: pass an existing file or folder")
    try:
        ds = datasets.load_dataset(cfg.source, split=cfg.split)
    except Exception as e:  # offline, unknown name, gated, ...: one line that says what to do
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"could not load dataset {cfg.source!r} from the Hub ({first}); if offline, pass local "
            ".txt/.jsonl/.json/.parquet files or a folder with --data"
        ) from None
    return _to_text(ds, cfg)


def _to_text(ds, cfg: DataConfig):
    cols = ds.column_names
    if cfg.text_field:
        if cfg.text_field not in cols:
            raise DataError(f"data.text_field {cfg.text_field!r} is not a column; columns are {cols}")
        field = cfg.text_field
        return ds.map(lambda r: {"text": str(r[field] or "")}, remove_columns=cols)
    use_alpaca = cfg.template == "alpaca" or (cfg.template == "auto" and {"instruction", "output"} <= set(cols))
    if use_alpaca:
        missing = {"instruction", "output"} - set(cols)
        if missing:
            raise DataError(f"data.template alpaca needs columns instruction and output; columns are {cols}")
        return ds.map(lambda r: {"text": alpaca(r)}, remove_columns=cols)
    if "text" in cols:
        return ds.select_columns(["text"])
    raise DataError(f"cannot find text in columns {cols}: set data.text_field=<column> (or data.template=alpaca)")


def tokenize_and_pack(ds, tokenizer, cfg: DataConfig) -> PackedData:
    """Shuffle documents (seeded), tokenize them (BOS/EOS around each), concatenate and cut into seq_len blocks."""
    ds = ds.filter(lambda r: bool(r["text"] and r["text"].strip()))
    if len(ds) == 0:
        raise DataError(f"data source {cfg.source!r} has no text")
    ds = ds.shuffle(seed=cfg.seed)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def tok(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [([bos] if bos is not None else []) + x + ([eos] if eos is not None else []) for x in ids]}

    ds = ds.map(tok, batched=True, remove_columns=ds.column_names)
    stream = torch.tensor([t for ids in ds["ids"] for t in ids], dtype=torch.long)
    n = stream.numel() // cfg.seq_len
    need = cfg.val_sequences + 1
    if n < need:
        raise DataError(
            f"data source {cfg.source!r} has {stream.numel()} tokens, only {n} sequences of data.seq_len={cfg.seq_len}; "
            f"need at least {need} (data.val_sequences={cfg.val_sequences} + 1): add data or lower data.seq_len"
        )
    blocks = stream[: n * cfg.seq_len].view(n, cfg.seq_len)
    val, train = blocks[: cfg.val_sequences], blocks[cfg.val_sequences:]
    if cfg.max_sequences:
        train = train[: cfg.max_sequences]
    return PackedData(train=train, val=val, source=cfg.source, documents=len(ds))


def load_data(cfg: DataConfig, tokenizer) -> PackedData:
    if cfg.source.endswith(".npy"):
        return pack_tokens(cfg)
    return tokenize_and_pack(load_records(cfg), tokenizer, cfg)


def pack_tokens(cfg: DataConfig) -> PackedData:
    """A pre-tokenized stream: a 1-D integer .npy array of token ids (documents already joined with BOS/EOS).
    For corpora tokenized once and reused, and for machines without `datasets`."""
    import numpy as np

    path = Path(cfg.source).expanduser()
    if not path.is_file():
        raise DataError(f"token file {path} does not exist")
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"token file {path} must hold a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    n = len(arr) // cfg.seq_len
    if n < cfg.val_sequences + 1:
        raise DataError(f"token file {path} has {len(arr)} tokens, fewer than {cfg.val_sequences + 1} sequences of "
                        f"data.seq_len={cfg.seq_len}: add data or lower data.seq_len")
    blocks = torch.from_numpy(np.asarray(arr[: n * cfg.seq_len], dtype=np.int64)).view(n, cfg.seq_len)
    g = torch.Generator().manual_seed(cfg.seed)
    blocks = blocks[torch.randperm(n, generator=g)]
    val, train = blocks[: cfg.val_sequences], blocks[cfg.val_sequences:]
    if cfg.max_sequences:
        train = train[: cfg.max_sequences]
    return PackedData(train=train, val=val, source=cfg.source, documents=0)


class BatchSampler:
    """Deterministic batches over the packed sequences: epoch e visits them in a permutation seeded by (seed, e).
    The position is one integer (micro-batches consumed), so a checkpoint can resume mid-epoch exactly."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world = rank, world
        self.global_batch = batch_size * world
        self.per_epoch = max(len(data) // self.global_batch, 1)
        if len(data) < self.global_batch:
            raise DataError(f"only {len(data)} training sequences for a batch of {self.global_batch}: add data or lower the batch size")
        self.position = 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.data), generator=g), epoch
        return self._perm

    def next(self) -> torch.Tensor:
        epoch, i = divmod(self.position, self.per_epoch)
        perm = self._permutation(epoch)
        start = i * self.global_batch + self.rank * self.batch_size
        self.position += 1
        return self.data[perm[start:start + self.batch_size]]

    @property
    def epoch(self) -> float:
        return self.position / self.per_epoch
