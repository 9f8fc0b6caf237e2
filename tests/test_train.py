"""Recipes, data and the two training stages (issue: lincat convert)."""

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from lincat.cli import app
from lincat.pipeline import RunError, run
from lincat.recipe import RecipeError, load_recipe
from lincat.train.data import DataError, load_data
from lincat.train.loop import TrainingDiverged
from lincat.train.recover import add_lora, teacher_logits
from conftest import SHARED, STORIES, stories_model

STORY = SHARED / "data" / "bench" / "tinystories_sample.txt"
# Small and fast: windows shorter than the sequences so the linear state matters.
FAST = ["data.seq_len=64", "data.val_sequences=4", "attention.window=16", "attention.chunk_size=16",
        "stage1.grad_accum=1", "stage2.grad_accum=1", "stage1.lr=1e-2", "stage2.lr=1e-3",
        "stage1.eval_every=4", "stage2.eval_every=4", "runtime.log_every=2", "runtime.checkpoint_every=2"]


# --- recipes ---

def test_bundled_recipes_load_with_paper_settings():
    lol = load_recipe("lolcats")
    assert (lol.attention.kind, lol.attention.window, lol.stage1.lr, lol.stage2.lora_rank, lol.stage2.lora_alpha) == \
        ("lolcats", 64, 1e-2, 8, 16)
    assert lol.data.source == "yahma/alpaca-cleaned" and lol.data.seq_len == 1024
    liger = load_recipe("liger")
    assert liger.stage1.max_steps == 0 and liger.stage2.lr == 1e-3 and liger.stage2.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert load_recipe("swa").attention.kind == "swa" and load_recipe("hedgehog").attention.kind == "hedgehog"


def test_overrides_and_unknown_keys():
    r = load_recipe("lolcats", ["stage1.max_steps=200", "attention.window=32", "stage2.loss=ce+kd",
                                "attention.softmax_layers=[0, 15]", "stage1.lr=1e-3"])
    assert (r.stage1.max_steps, r.attention.window, r.stage2.loss, r.attention.softmax_layers, r.stage1.lr) == \
        (200, 32, "ce+kd", [0, 15], 1e-3)
    with pytest.raises(RecipeError, match="did you mean 'stage1.lr'"):
        load_recipe("lolcats", ["stage1.lrr=1"])
    with pytest.raises(RecipeError, match="did you mean 'attention.window'"):
        load_recipe("lolcats", ["attention.windw=3"])
    with pytest.raises(RecipeError, match="must be an integer"):
        load_recipe("lolcats", ["stage1.max_steps=lots"])
    with pytest.raises(RecipeError, match="stage2.loss"):
        load_recipe("lolcats", ["stage2.loss=mse"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe("lolcats", ["stage1.lr"])


def test_recipe_yaml_unknown_key(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("attention:\n  kind: lolcats\n  feature_dimm: 32\n")
    with pytest.raises(RecipeError, match="did you mean 'attention.feature_dim'"):
        load_recipe(f)


# --- data ---

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


def test_local_formats_and_alpaca_template(tmp_path, tokenizer):
    recs = [{"instruction": f"Say {i}", "input": "" if i % 2 else "x", "output": "Once upon a time " * 5} for i in range(40)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    (tmp_path / "b.txt").write_text("Lily saw a cat. " * 200)
    cfg = load_recipe("lolcats", ["data.seq_len=32", "data.val_sequences=2"]).data
    cfg.source = str(tmp_path)
    packed = load_data(cfg, tokenizer)
    assert packed.train.shape[1] == 32 and packed.val.shape == (2, 32)
    again = load_data(cfg, tokenizer)
    assert torch.equal(packed.train, again.train)  # seeded and deterministic
    from lincat.train.data import alpaca, load_records
    cfg.source = str(tmp_path / "a.jsonl")
    texts = load_records(cfg)["text"]
    assert texts[0].startswith("Below is an instruction") and "### Response:" in texts[0]
    assert alpaca({"instruction": "a", "output": "b"}).count("### Input") == 0


def test_bad_data_errors(tmp_path, tokenizer):
    cfg = load_recipe("lolcats", ["data.seq_len=64"]).data
    cfg.source = str(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="does not exist"):
        load_data(cfg, tokenizer)
    (tmp_path / "empty.txt").write_text("   \n")
    cfg.source = str(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no text"):
        load_data(cfg, tokenizer)
    (tmp_path / "short.txt").write_text("tiny")
    cfg.source = str(tmp_path / "short.txt")
    with pytest.raises(DataError, match="lower data.seq_len"):
        load_data(cfg, tokenizer)
    (tmp_path / "r.jsonl").write_text('{"foo": "bar"}\n')
    cfg.source = str(tmp_path / "r.jsonl")
    with pytest.raises(DataError, match="text_field"):
        load_data(cfg, tokenizer)
    cfg.source = "someone/no-such-dataset-offline"
    with pytest.raises(DataError, match="offline"):
        load_data(cfg, tokenizer)


# --- the stages ---

def _runs(tmp_path, name, extra=(), **kw):
    return run(str(STORIES), "lolcats", str(STORY), str(tmp_path / name), FAST + list(extra), export=False, **kw)


def test_stage1_reduces_mse_and_stage2_reduces_val_loss(tmp_path):
    s = _runs(tmp_path, "a", ["stage1.max_steps=12", "stage2.max_steps=12"])
    s1, s2 = s["stages"]["stage1"], s["stages"]["stage2"]
    trained = lambda st: min(v for step, v in st["val_history"] if step > 0)  # noqa: E731
    assert s1["val_history"][0][0] == 0 and trained(s1) < 0.8 * s1["first_val"]  # attention-output MSE
    assert trained(s2) < s2["first_val"]  # validation next-token loss
    info = json.loads((tmp_path / "a" / "lincat_run.json").read_text())
    assert info["tokens"] == 24 * 64 and info["stages"]["stage2"]["steps"] == 12
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} == {"stage1", "stage2"} and any("val_loss" in x for x in lines)


def test_kd_uses_the_same_model_as_teacher(tmp_path, monkeypatch):
    import lincat

    base = stories_model()
    ids = torch.randint(3, 500, (2, 48))
    ref = base(ids).logits
    model = lincat.convert(copy.deepcopy(base), "lolcats", window=16)
    peft_model, _ = add_lora(model, load_recipe("lolcats").stage2)
    with torch.no_grad():  # make LoRA non-trivial so "adapter disabled" is really tested
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    assert (teacher_logits(peft_model, ids) - ref).abs().max() < 1e-4
    # A KD run builds no second model: it constructs exactly as many models as a plain next-token run.
    from transformers import PreTrainedModel

    count = {"n": 0}
    init = PreTrainedModel.__init__

    def counting_init(self, *a, **k):
        count["n"] += 1
        init(self, *a, **k)

    monkeypatch.setattr(PreTrainedModel, "__init__", counting_init)
    built = {}
    for loss in ("ce", "kd"):
        count["n"] = 0
        s = _runs(tmp_path, loss, ["stage1.max_steps=0", "stage2.max_steps=6", f"stage2.loss={loss}"])
        built[loss] = count["n"]
    assert built["kd"] == built["ce"] > 0
    lines = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd" in x for x in lines)  # the KD term was really computed


class Kill(Exception):
    pass


@pytest.mark.parametrize("kill_stage,kill_step", [("stage1", 5), ("stage2", 3)])
def test_resume_after_kill_matches_uninterrupted(tmp_path, kill_stage, kill_step):
    extra = ["stage1.max_steps=6", "stage2.max_steps=6", "stage2.loss=ce+kd"]
    full = _runs(tmp_path, "full", extra)

    def killer(stage):
        if stage.name == kill_stage and stage.step == kill_step:
            raise Kill()

    with pytest.raises(Kill):
        _runs(tmp_path, "killed", extra, on_step=killer)
    assert (tmp_path / "killed" / "checkpoints" / kill_stage / "latest").exists()
    resumed = run(str(STORIES), "lolcats", str(STORY), str(tmp_path / "killed"), [], resume=True, export=False)
    for st in ("stage1", "stage2"):
        assert abs(resumed["stages"][st]["final_loss"] - full["stages"][st]["final_loss"]) < 1e-6
        assert abs(resumed["stages"][st]["best_val"] - full["stages"][st]["best_val"]) < 1e-6


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    def poison(stage):
        if stage.step == 3:
            with torch.no_grad():
                next(iter(stage.params.values())).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"last good checkpoint .* is kept.*--resume"):
        _runs(tmp_path, "nan", ["stage1.max_steps=8", "stage2.max_steps=0"], on_step=poison)
    assert (tmp_path / "nan" / "checkpoints" / "stage1" / "latest" / "params.safetensors").exists()


def test_run_dir_guards(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("1")
    with pytest.raises(RunError, match="--resume"):
        _runs(tmp_path, "busy")
    with pytest.raises(RunError, match="nothing to resume"):
        run(str(STORIES), "lolcats", str(STORY), str(tmp_path / "new"), [], resume=True)
    with pytest.raises(RunError, match="does not exist"):
        run(str(tmp_path / "no-model"), "lolcats", str(STORY), str(tmp_path / "m"), FAST)


def test_offline_hub_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RunError, match="pass a local model directory"):
        run("nobody-here/not-cached-model", "lolcats", str(STORY), str(tmp_path / "o"), FAST)


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["convert", str(STORIES), "--data", str(STORY), "--out", str(tmp_path / "c"),
                              "--set", "stage1.max_step=3"])
    assert res.exit_code == 2
    assert "did you mean 'stage1.max_steps'" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["recipes"])
    assert res.exit_code == 0 and "lolcats" in res.output and "liger" in res.output
    for cmd in ("convert", "export", "push", "eval", "recipes", "demo"):
        assert "Example" in runner.invoke(app, [cmd, "--help"]).output
