"""lm-eval tasks on an in-memory model (lm_eval.models.huggingface.HFLM wraps the model object and
its tokenizer; nothing is saved or reloaded), including tasks over local files so that they run
offline.

Task names resolve, in order, against: the bundled tasks below, the YAML tasks of `tasks_dir`
(an lm-eval include path; a task there reads local data with `dataset_path: json` and
`dataset_kwargs: {data_files: {test: /abs/path.jsonl}}`), then lm-eval's registry (its tasks
download their data sets, so they need the hub).

Bundled: `pydoc_mc`, a 4-way multiple-choice continuation task built from the same pydoc text as
the perplexity corpus, from the part that neither evaluation nor calibration touches (see
`pydoc_mc_items`). Each item shows 20 words of a prose paragraph; the answer is its next 8 words,
the three distractors are 8 words at the same position of other paragraphs. Scored by lm-eval's
multiple_choice: acc (sum of log-likelihood) and acc_norm (per character of the choice, as lm-eval
divides: not per byte, which differs for the non-ASCII choices).
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import random
import re
from dataclasses import dataclass

from compress.data import pydoc_text
from compress.errors import UserError
from compress.sources import file_sha256

BUNDLED = ("pydoc_mc",)
# pydoc_mc reads characters [25%, 45%) of the pydoc text. For SmolLM2's tokenizer the 20 evaluation
# windows end at 18% of the characters and calibration starts at 49% (tests/test_lm_eval_tasks.py
# checks it on the real tokenizer); a byte tokenizer's split is at 4% and 50%.
PYDOC_MC_SPAN = (0.25, 0.45)
PROSE_WORD = re.compile(r"^[(\"']?[A-Za-z][a-z]*[.,;:)\"']*$")


@dataclass
class TaskSettings:
    names: tuple[str, ...]
    tasks_dir: str | None = None
    limit: int | None = None        # documents per task (None: all)
    batch_size: int = 16
    num_fewshot: int | None = None  # None: each task's own default

    def __post_init__(self):
        for flag, value, low in (("--tasks-limit", self.limit, 1),
                                 ("--tasks-batch-size", self.batch_size, 1),
                                 ("--tasks-fewshot", self.num_fewshot, 0)):
            if value is not None and value < low:
                raise UserError(f"{flag} must be >= {low}, got {value}")


def parse_task_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UserError(f"--tasks expects NAME[,NAME...], got {text!r}; bundled: "
                        f"{', '.join(BUNDLED)}")
    return names


class TaskRunner:
    """Resolves and loads the tasks once (bad names and unreadable files fail before any model
    work), then scores any number of models on them."""

    def __init__(self, settings: TaskSettings, workdir: str):
        self.settings = settings
        if settings.tasks_dir is not None and not os.path.isdir(settings.tasks_dir):
            raise UserError(f"--tasks-dir {settings.tasks_dir!r} is not a folder")
        self.specs = [self._bundled(name, workdir) if name in BUNDLED else name
                      for name in settings.names]
        with _quiet():
            self.manager = _task_manager(settings, [n for n in settings.names
                                                    if n not in BUNDLED])
            try:
                loaded = self.manager.load(self.specs)
            except (KeyError, ValueError, FileNotFoundError, OSError) as exc:
                raise UserError(f"could not load lm-eval task(s) {', '.join(settings.names)}: "
                                f"{_first_line(exc)}; bundled: {', '.join(BUNDLED)}; local "
                                "tasks: YAML files in --tasks-dir") from exc
        self.task_names = sorted(loaded["tasks"])
        self.data_files = _data_files(loaded["tasks"])

    @staticmethod
    def _bundled(name: str, workdir: str) -> dict:
        path = os.path.join(workdir, f"{name}.jsonl")
        write_jsonl(pydoc_mc_items(), path)
        return pydoc_mc_config(path)

    def protocol(self) -> dict:
        import lm_eval

        s = self.settings
        return {"names": list(s.names), "tasks": self.task_names, "limit": s.limit,
                "num_fewshot": s.num_fewshot, "batch_size": s.batch_size,
                "lm_eval": lm_eval.__version__, "data_files": self.data_files}

    def run(self, model, tokenizer) -> dict:
        """{task: {metric: value, metric_stderr: value, samples: n, version: v}}."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        s = self.settings
        with _quiet(), _preserved_random_state():
            # HFLM on a model object uses the model where it is, in its dtype; it warns that device
            # arguments are ignored, which is what we want.
            with _quiet("lm_eval.models.huggingface", logging.ERROR):
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=s.batch_size)
            out = simple_evaluate(model=lm, tasks=self.specs, task_manager=self.manager,
                                  limit=s.limit, num_fewshot=s.num_fewshot,
                                  bootstrap_iters=1000, log_samples=False)
        return task_scores(out)


def task_scores(out: dict) -> dict:
    """lm-eval's results ('acc,none': 0.5, 'acc_stderr,none': 0.1) as {'acc': .5, 'acc_stderr': .1};
    filtered ones ('exact_match,strict': 1.0, 'exact_match_stderr,strict': .2) as
    {'exact_match[strict]': 1.0, 'exact_match[strict]_stderr': .2}."""
    scores = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # alias, name, sample_len; 'N/A' stderr
            if filt == "none":
                name = metric
            elif metric.endswith("_stderr"):  # the metric's own error bar: 'em[strict]_stderr'
                name = f"{metric.removesuffix('_stderr')}[{filt}]_stderr"
            else:
                name = f"{metric}[{filt}]"
            row[name] = float(value)
        if task in out.get("n-samples", {}):
            row["samples"] = out["n-samples"][task]["effective"]
        if task in out.get("versions", {}):
            row["version"] = out["versions"][task]
        scores[task] = row
    return scores


def _task_manager(settings: TaskSettings, external: list[str]):
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=settings.tasks_dir, include_defaults=False) \
        if settings.tasks_dir else None
    # Indexing lm-eval's 14k built-in task configs takes 10+ s: only when a name needs it.
    if local is not None and all(name in local.all_tasks for name in external):
        return local
    if local is None and not external:
        return TaskManager(include_defaults=False)
    return TaskManager(include_path=settings.tasks_dir)


def _data_files(tasks: dict) -> dict:
    """Local data files of the loaded tasks, with their sha256: what the scores were measured on."""
    found = {}
    for name, task in tasks.items():
        kwargs = getattr(task.config, "dataset_kwargs", None) or {}
        files = kwargs.get("data_files") or {}
        files = files if isinstance(files, dict) else {"data": files}
        for split, path in files.items():
            # Every file a split reads: a list names several, a pattern matches several.
            paths = sorted({one for pattern in ([path] if isinstance(path, str) else path)
                            for one in (glob.glob(pattern, recursive=True)
                                        if glob.has_magic(pattern) else [pattern])
                            if os.path.isfile(one)})
            for i, one in enumerate(paths):
                key = f"{name}:{split}" if len(paths) == 1 else f"{name}:{split}[{i}]"
                found[key] = {"path": os.path.basename(one), "sha256": file_sha256(one)}
    return found


def pydoc_mc_items(count: int = 400, seed: int = 0, context_words: int = 20,
                   answer_words: int = 8) -> list[dict]:
    """Multiple-choice continuations from the prose paragraphs of pydoc characters
    [25%, 45%): one item per paragraph (at most `count`), choices shuffled with `seed`."""
    text = pydoc_text()
    lo, hi = (int(f * len(text)) for f in PYDOC_MC_SPAN)
    need = context_words + answer_words
    paragraphs = [p.split() for p in text[lo:hi].split("\n\n")[1:-1]]  # drop the cut ends
    # Prose only: code and tables have few plain words, and joining their lines loses layout.
    paragraphs = [w for w in paragraphs if len(w) >= need and ">>>" not in w
                  and sum(bool(PROSE_WORD.match(x)) for x in w) >= 0.8 * len(w)][:count]
    answers = [" " + " ".join(w[context_words:need]) for w in paragraphs]
    rng = random.Random(seed)
    items = []
    for i, words in enumerate(paragraphs):
        others = rng.sample([j for j in range(len(paragraphs)) if answers[j] != answers[i]], 3)
        choices = [answers[i]] + [answers[j] for j in others]
        rng.shuffle(choices)
        items.append({"context": " ".join(words[:context_words]), "choices": choices,
                      "label": choices.index(answers[i])})
    return items


def pydoc_mc_config(path: str) -> dict:
    return {"task": "pydoc_mc", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": os.path.abspath(path)}},
            "output_type": "multiple_choice", "test_split": "test",
            "doc_to_text": "{{context}}", "doc_to_target": "label", "doc_to_choice": "choices",
            "target_delimiter": "",  # the choices start with their own space
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean",
                             "higher_is_better": True}],
            "metadata": {"version": 1.0}}


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def _quiet(name: str = "lm_eval", level: int = logging.WARNING):
    """lm-eval logs every step at INFO: keep its warnings and errors, for the duration of a call."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def _preserved_random_state():
    """simple_evaluate seeds python, numpy and torch globally; give the caller its state back."""
    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().strip("'\"")
    return text.splitlines()[0] if text else type(exc).__name__
