"""lm-evaluation-harness tasks, run in-process on the model object (HFLM), with offline task files for the
benchmark data in ../shared/data/bench (PIQA, BIG-bench StrategyQA and Physical Intuition)."""

from pathlib import Path

# Task YAMLs that read local JSON lines (dataset_path: json); {data} is filled with the data folder.
LOCAL_TASKS = {
    "piqa_local": """task: piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}/piqa_validation.jsonl
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "strategyqa_local": """task: strategyqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}/bigbench_strategyqa.jsonl
validation_split: validation
output_type: multiple_choice
doc_to_text: "Q: {{{{input}}}}\\nA:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
""",
    "physical_intuition_local": """task: physical_intuition_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}/bigbench_physical_intuition.jsonl
validation_split: validation
output_type: multiple_choice
doc_to_text: "Q: {{{{input}}}}\\nA:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
""",
}


def write_local_tasks(data_dir, out_dir) -> Path:
    """Write the offline task YAMLs for `data_dir` into `out_dir` (pass it as include_path)."""
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in LOCAL_TASKS.items():
        (out_dir / f"{name}.yaml").write_text(text.format(data=data_dir))
    return out_dir


def run_lm_eval(model, tokenizer, tasks: list[str], include_path=None, limit=None, batch_size: int = 8) -> dict:
    """{task: {metric: value}} from lm-eval's simple_evaluate on the in-memory model."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("lm-eval tasks need lm-eval: pip install 'lincat[eval]'") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    out = {}
    for task in tasks:
        metrics = res["results"].get(task, {})
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and "stderr" not in k and not k.startswith("sample_len")}
    return out
