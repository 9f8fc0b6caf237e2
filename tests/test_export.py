"""Export: a self-contained folder that plain transformers loads with trust_remote_code=True, lincat.load, push."""

import json
import subprocess
import sys

import pytest
import torch

import lincat
from lincat.export import ExportError, export_run, flatten_source, modeling_files, MODELING_DIR
from lincat.hub import HubError, push_folder
from lincat.pipeline import run
from conftest import SHARED, STORIES

STORY = SHARED / "data" / "bench" / "tinystories_sample.txt"
KINDS = ["hedgehog", "lolcats", "liger", "swa"]
FAST = ["data.seq_len=64", "data.val_sequences=4", "attention.window=16", "attention.chunk_size=16",
        "stage1.grad_accum=1", "stage2.grad_accum=1", "stage1.max_steps=3", "stage2.max_steps=3",
        "stage1.eval_every=0", "stage2.eval_every=0", "runtime.log_every=3", "stage2.lr=1e-2"]

# Runs in a fresh interpreter where `import lincat` fails: loads every export with plain transformers.
REMOTE = r"""
import json, sys
sys.modules["lincat"] = None  # prove the export needs no lincat
import torch
from transformers import AutoModelForCausalLM
try:
    import lincat
    raise SystemExit("lincat is importable")
except ImportError:
    pass
jobs = json.loads(sys.argv[1])
for job in jobs:
    model = AutoModelForCausalLM.from_pretrained(job["path"], trust_remote_code=True, dtype=torch.float32)
    if job.get("adapter"):
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, job["path"] + "/adapter")
    model.eval()
    ids = torch.load(job["ids"])
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids[:1, :12], max_new_tokens=16, do_sample=False, pad_token_id=0)
    torch.save({"logits": logits, "gen": gen, "cls": type(model).__name__}, job["out"])
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short lincat run per attention kind (trained a few steps, exported into the run folder)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in KINDS:
        d = root / kind
        run(str(STORIES), "lolcats", str(STORY), str(d), FAST + [f"attention.kind={kind}"])
        out[kind] = d
    return out


def reference(path, ids, adapter=False):
    model = lincat.load(path, dtype=torch.float32, adapter=adapter).eval()
    with torch.no_grad():
        return model(ids).logits, model.generate(ids[:1, :12], max_new_tokens=16, do_sample=False, pad_token_id=0)


def remote(jobs, tmp_path):
    res = subprocess.run([sys.executable, "-c", REMOTE, json.dumps(jobs)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [torch.load(j["out"]) for j in jobs]


def test_exports_load_without_lincat(runs, tmp_path):
    ids = torch.randint(3, 500, (2, 70), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    jobs, refs = [], []
    for kind, d in runs.items():
        exp = tmp_path / f"exp-{kind}"
        export_run(d, exp, dtype="fp32")
        jobs.append({"path": str(exp), "ids": str(tmp_path / "ids.pt"), "out": str(tmp_path / f"{kind}.pt")})
        refs.append(reference(exp, ids))
        cfg = json.loads((exp / "config.json").read_text())
        assert cfg["model_type"] == "lincat" and cfg["base_model_type"] == "llama"
        assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
        assert cfg["lincat"]["layers"][0]["kind"] == kind
        card = (exp / "README.md").read_text()
        assert "trust_remote_code=True" in card and "| 32K |" in card and "stories260K" in card
        assert (exp / "tokenizer.json").exists() and (exp / "generation_config.json").exists()
    # the run folder itself also holds the merged export
    jobs.append({"path": str(runs["lolcats"]), "ids": str(tmp_path / "ids.pt"), "out": str(tmp_path / "rundir.pt")})
    refs.append(reference(runs["lolcats"], ids))
    for job, got, (logits, gen) in zip(jobs, remote(jobs, tmp_path), refs):
        assert got["cls"] == "LincatForCausalLM"
        assert (got["logits"] - logits).abs().max() < 1e-4, job["path"]
        assert torch.equal(got["gen"], gen), job["path"]


def test_no_merge_export_with_peft(runs, tmp_path):
    ids = torch.randint(3, 500, (2, 50), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    merged, unmerged = tmp_path / "merged", tmp_path / "unmerged"
    export_run(runs["lolcats"], merged, dtype="fp32")
    export_run(runs["lolcats"], unmerged, dtype="fp32", merge=False)
    assert (unmerged / "adapter" / "adapter_config.json").exists()
    ref_logits, ref_gen = reference(merged, ids)
    lora_logits, _ = reference(unmerged, ids, adapter=True)
    assert (lora_logits - ref_logits).abs().max() < 1e-4
    (got,) = remote([{"path": str(unmerged), "ids": str(tmp_path / "ids.pt"), "out": str(tmp_path / "u.pt"),
                      "adapter": True}], tmp_path)
    assert (got["logits"] - ref_logits).abs().max() < 1e-4


def test_lincat_load_is_trainable(runs):
    from lincat.modeling.modeling_lincat import LincatAttention, set_attention_mode

    model = lincat.load(runs["lolcats"], dtype=torch.float32)
    attn = [m for m in model.modules() if isinstance(m, LincatAttention)]
    assert attn and any(p.requires_grad for p in attn[0].parameters())
    ids = torch.randint(3, 500, (1, 40))
    model(ids).logits.sum().backward()
    assert attn[0].feature_map_q.weight.grad is not None
    set_attention_mode(model, "teacher")  # teacher mode still works on a loaded export


def test_exported_code_is_the_package_code():
    files = modeling_files()
    assert "modeling_lincat.py" in files and "kernels_window_linear_attn_chunk.py" in files
    for name, text in files.items():
        for line in text.splitlines():
            stripped = line.strip()
            assert not stripped.startswith("from ..") and not stripped.startswith("import lincat"), (name, line)
            assert "from lincat" not in stripped, (name, line)
    # every exported file is its package file with only the relative imports renamed
    src = (MODELING_DIR / "kernels" / "gla" / "torch_chunk.py").read_text().splitlines()
    out = files["kernels_gla_torch_chunk.py"].splitlines()
    diff = [(a, b) for a, b in zip(src, out) if a != b]
    assert len(src) == len(out) and diff and all(a.lstrip().startswith("from ..") for a, _ in diff)
    text, deps = flatten_source(__import__("pathlib").Path("ops.py"))
    assert "from .kernels_linear_attn_torch_chunk import chunk_linear_attn_torch" in text


def test_interrupted_export_never_looks_complete(runs, tmp_path, monkeypatch):
    import lincat.export as ex

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "modeling_files", boom)
    with pytest.raises(KeyboardInterrupt):
        export_run(runs["swa"], tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    with pytest.raises(ExportError, match="lincat_run.json"):
        export_run(tmp_path, tmp_path / "x")


class StubApi:
    def __init__(self, logged_in=True):
        self.calls, self.logged_in = [], logged_in

    def whoami(self):
        if not self.logged_in:
            raise RuntimeError("Invalid user token.")
        return {"name": "tester"}

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))


def test_push_with_stub(runs, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    d = runs["liger"]
    listed = dict(push_folder(d, "me/model", dry_run=True))
    assert "config.json" in listed and "model.safetensors" in listed and "modeling_lincat.py" in listed
    assert not any(k.startswith(("checkpoints/", "train/")) for k in listed)
    api = StubApi()
    push_folder(d, "me/model", private=True, revision="v1", api=api)
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2]["private"] is True and api.calls[2][2]["revision"] == "v1"
    assert api.calls[2][2]["folder_path"] == str(d)
    with pytest.raises(HubError, match="not logged in"):
        push_folder(d, "me/model", api=StubApi(logged_in=False))
    with pytest.raises(HubError, match="does not exist"):
        push_folder(tmp_path / "nope", "me/model", api=StubApi())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_folder(d, "me/model", api=StubApi())


@pytest.mark.parametrize("kind, extra", [(k, {}) for k in KINDS] + [("swa", {"sinks": 2})])
def test_model_card_state_size_is_the_cache_size(kind, extra):
    """The card's per-sequence state table counts exactly the bytes the decode cache holds (minus pos/ticket)."""
    from conftest import tiny_model
    from lincat.export import state_bytes
    from lincat.modeling.cache import LincatCache, LincatLayerCache
    from lincat.modeling.modeling_lincat import lincat_modules

    model = lincat.convert(tiny_model("llama"), kind, window=8, backend="torch", **extra)
    cache = LincatCache(model.config)
    with torch.no_grad():
        model(torch.randint(3, 100, (3, 20)), past_key_values=cache, use_cache=True)
    layers = [c for c in cache.layers if isinstance(c, LincatLayerCache)]
    specs = [m.spec for m in lincat_modules(model)]
    assert layers and len(layers) == len(specs)
    for layer, spec in zip(layers, specs):
        held = sum(t.numel() * t.element_size() for k, t in layer.state.items() if k not in ("pos", "ticket"))
        assert held == 3 * state_bytes(spec, 4), (kind, {k: tuple(t.shape) for k, t in layer.state.items()})
