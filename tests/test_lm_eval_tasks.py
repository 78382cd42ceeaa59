"""lm-eval tasks over local files on an in-memory model (evaluate/lm_eval_tasks.py)."""
import json
import random

import numpy as np
import pytest
import torch
import yaml

from compress.data import pydoc_text
from compress.errors import UserError
from compress.evaluate.lm_eval_tasks import TaskRunner, TaskSettings, pydoc_mc_items, task_scores

# A random model knows nothing, so the tests check the mechanics (counts, ranges, provenance) and
# one exact property: when every choice is the same string the log-likelihoods tie and lm-eval
# picks the first, so label 0 scores acc 1.0.
ITEMS = [{"q": f"Question {i}:", "choices": [" yes", " no"], "label": i % 2} for i in range(6)]
SAME = [{"q": "Same:", "choices": [" a", " a", " a"], "label": 0} for _ in range(3)]


def _task_dir(tmp_path):
    tmp_path.mkdir()
    for name, rows in (("local_yes_no", ITEMS), ("local_same", SAME)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = {"task": name, "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {"test": str(data)}},
                  "output_type": "multiple_choice", "test_split": "test",
                  "doc_to_text": "{{q}}", "doc_to_target": "label", "doc_to_choice": "choices",
                  "metric_list": [{"metric": "acc", "aggregation": "mean",
                                   "higher_is_better": True}],
                  "metadata": {"version": 2.0}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_local_task_runs_on_the_in_memory_tiny_model(tiny, tmp_path):
    tasks_dir = _task_dir(tmp_path / "tasks")
    settings = TaskSettings(names=("local_yes_no", "local_same"), tasks_dir=str(tasks_dir),
                            batch_size=4)
    runner = TaskRunner(settings, str(tmp_path))
    random.seed(11)
    state = torch.random.get_rng_state()
    scores = runner.run(tiny.model, tiny.tokenizer)
    # lm-eval seeds python/numpy/torch globally; the caller's generators are given back.
    assert random.random() == random.Random(11).random()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert scores["local_yes_no"]["samples"] == 6 and scores["local_yes_no"]["version"] == 2.0
    assert 0.0 <= scores["local_yes_no"]["acc"] <= 1.0
    assert "acc_stderr" in scores["local_yes_no"]
    assert scores["local_same"]["acc"] == 1.0
    proto = runner.protocol()
    assert proto["tasks"] == ["local_same", "local_yes_no"]
    assert proto["data_files"]["local_yes_no:test"]["sha256"]


def test_limit_and_bundled_pydoc_task(tiny, tmp_path):
    runner = TaskRunner(TaskSettings(names=("pydoc_mc",), limit=5, batch_size=8), str(tmp_path))
    scores = runner.run(tiny.model, tiny.tokenizer)["pydoc_mc"]
    assert scores["samples"] == 5 and 0.0 <= scores["acc_norm"] <= 1.0


def test_pydoc_items_are_well_formed_and_deterministic():
    items = pydoc_mc_items()
    assert items == pydoc_mc_items()
    assert len(items) >= 100
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert all(c.startswith(" ") and len(c.split()) == 8 for c in item["choices"])
        assert len(item["context"].split()) == 20
    labels = np.bincount([i["label"] for i in items], minlength=4)
    assert labels.min() > len(items) / 8  # the right answer is not always in one place


def test_missing_folder_or_data_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        TaskRunner(TaskSettings(names=("x",), tasks_dir=str(tmp_path / "nope")), str(tmp_path))
    tasks_dir = _task_dir(tmp_path / "tasks")
    (tasks_dir / "local_same.jsonl").unlink()
    with pytest.raises(UserError, match="could not load lm-eval task"):
        TaskRunner(TaskSettings(names=("local_same",), tasks_dir=str(tasks_dir)), str(tmp_path))


def test_scores_flatten_lm_eval_keys():
    out = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                             "exact_match,strict": 1.0, "exact_match_stderr,strict": 0.2}},
           "n-samples": {"t": {"original": 9, "effective": 4}}, "versions": {"t": 1.0}}
    # A filtered metric's stderr stays its error bar (the report pairs 'X' with 'X_stderr').
    assert task_scores(out) == {"t": {"acc": 0.5, "exact_match[strict]": 1.0,
                                      "exact_match[strict]_stderr": 0.2, "samples": 4,
                                      "version": 1.0}}


@pytest.mark.real_model
def test_pydoc_mc_text_is_outside_evaluation_and_calibration():
    """The bundled task's characters are read by neither the 20 evaluation windows nor the
    calibration samples of the pydoc protocol, with SmolLM2's tokenizer."""
    import os

    from transformers import AutoTokenizer

    from compress.evaluate.lm_eval_tasks import PYDOC_MC_SPAN
    from compress.sources import smollm2_path

    text = pydoc_text()
    folder, name = os.path.split(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc.offset_mapping
    eval_end = offsets[20 * 1024][0]
    calib_start = offsets[len(enc.input_ids) // 2][0]
    assert eval_end < PYDOC_MC_SPAN[0] * len(text)
    assert calib_start > PYDOC_MC_SPAN[1] * len(text)


def test_every_data_file_of_a_split_is_recorded(tmp_path):
    """A split may list files or name a pattern: each file read is recorded with its sha256
    (only the last of a list, and nothing for a pattern, were)."""
    data = tmp_path / "data"
    data.mkdir()
    paths = []
    for part in ("a", "b"):
        path = data / f"part_{part}.jsonl"
        path.write_text("".join(json.dumps({"q": f"{part}{i}:", "choices": [" yes", " no"],
                                            "label": i % 2}) + "\n" for i in range(2)))
        paths.append(str(path))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, files in (("listed", paths), ("globbed", str(data / "*.jsonl"))):
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": files}},
            "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{q}}",
            "doc_to_target": "label", "doc_to_choice": "choices",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    runner = TaskRunner(TaskSettings(("listed", "globbed"), str(tasks)), str(tmp_path))
    files = runner.protocol()["data_files"]
    for task in ("listed", "globbed"):
        recorded = sorted(f["path"] for key, f in files.items() if key.startswith(task + ":"))
        assert recorded == ["part_a.jsonl", "part_b.jsonl"], files


def test_the_right_choice_continues_the_context_in_the_pydoc_text():
    words = " ".join(pydoc_text().split())
    items = pydoc_mc_items()
    for item in items:
        right = item["choices"][item["label"]]
        assert f" {item['context']}{right} " in f" {words} ", item
        for wrong in item["choices"]:
            if wrong != right:
                assert f" {item['context']}{wrong} " not in f" {words} "
