"""LongBench (v1 and LongBench-E) with its official prompts, generation lengths and metrics.

Rows come from ``DIR/{name}.jsonl`` (``--data-dir``) or, online, from the hub. The runner cuts prompts longer
than the model's context minus the generation budget in the middle, keeping the first and last halves
(``truncate = True``), as LongBench's ``pred.py`` does. No chat template is applied (LongBench applies one
for chat models except on trec/triviaqa/samsum/lsht/lcc/repobench-p).

Query-agnostic split: the context part is the template up to where ``{input}`` begins (the instructions that
follow the document included); templates without ``{input}`` split right after ``{context}``.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .. import metrics
from .base import Example, read_jsonl, schema_problem

log = logging.getLogger(__name__)

DATASET2PROMPT = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    "passage_retrieval_zh": '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
DATASET2MAXLEN = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}  # fmt: skip
DATASET2METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": metrics.qa_f1_score, "qasper": metrics.qa_f1_score, "multifieldqa_en": metrics.qa_f1_score,
    "multifieldqa_zh": metrics.qa_f1_zh_score, "hotpotqa": metrics.qa_f1_score, "2wikimqa": metrics.qa_f1_score,
    "musique": metrics.qa_f1_score, "dureader": metrics.rouge_zh_score, "gov_report": metrics.rouge_score,
    "qmsum": metrics.rouge_score, "multi_news": metrics.rouge_score, "vcsum": metrics.rouge_zh_score,
    "trec": metrics.classification_score, "triviaqa": metrics.qa_f1_score, "samsum": metrics.rouge_score,
    "lsht": metrics.classification_score, "passage_retrieval_en": metrics.retrieval_score,
    "passage_count": metrics.count_score, "passage_retrieval_zh": metrics.retrieval_zh_score,
    "lcc": metrics.code_sim_score, "repobench-p": metrics.code_sim_score,
}  # fmt: skip
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}  # few-shot tasks: only the first generated line is scored
LONGBENCH_E = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip
DATASETS = (*DATASET2PROMPT, *(f"{name}_e" for name in LONGBENCH_E))
_SCHEMA = {
    "input": str, "context": str, "answers": list, "length": int,
    "all_classes": (list, type(None)), "language": str, "_id": str,
}  # fmt: skip


def base_name(dataset: str) -> str:
    """The LongBench dataset a (possibly LongBench-E, ``*_e``) dataset name uses the prompt and metric of."""
    return dataset.removesuffix("_e") if dataset.endswith("_e") and dataset[:-2] in LONGBENCH_E else dataset


def split_prompt(dataset: str, row: dict) -> tuple[str, str]:
    """(context part, question part) of the official prompt for ``row``."""
    template = DATASET2PROMPT[base_name(dataset)]
    marker = "{input}" if "{input}" in template else "{context}"
    cut = template.index(marker) + (len(marker) if marker == "{context}" else 0)
    return template[:cut].format(context=row["context"]), template[cut:].format(input=row["input"])


def _answers_problem(row: dict) -> str | None:
    if not row["answers"] or not all(isinstance(a, str) for a in row["answers"]):
        return "answers must be a non-empty list of strings"
    if row["all_classes"] is not None and not all(isinstance(c, str) for c in row["all_classes"]):
        return "all_classes must be a list of strings or null"
    return None


def _file_rows(path: Path) -> list[dict]:
    rows = []
    for number, row in read_jsonl(path, _SCHEMA):
        problem = _answers_problem(row)
        if problem:
            log.warning("%s:%d: skipped, %s", path, number, problem)
        else:
            rows.append(row)
    return rows


def _hub_rows(dataset: str) -> list[dict]:
    """The test split from the hub: ``datasets`` first, then the repo's ``data.zip`` (script-less ``datasets``)."""
    try:
        from datasets import load_dataset

        raw = [dict(r) for r in load_dataset("THUDM/LongBench", dataset, split="test")]
    except Exception as first:  # any failure (offline, script-less `datasets`) falls back to the zip
        try:
            from huggingface_hub import hf_hub_download

            archive = hf_hub_download("THUDM/LongBench", "data.zip", repo_type="dataset")
            with zipfile.ZipFile(archive) as z, z.open(f"data/{dataset}.jsonl") as f:
                raw = [json.loads(line) for line in io.TextIOWrapper(f, encoding="utf-8") if line.strip()]
        except Exception as error:
            raise RuntimeError(
                f"could not load LongBench {dataset!r} from the hub ({first}; {error}); "
                f"download it and pass --data-dir DIR holding {dataset}.jsonl"
            ) from error
    rows = []
    for number, row in enumerate(raw, start=1):
        problem = schema_problem(row, _SCHEMA) or _answers_problem(row)
        if problem:
            log.warning("THUDM/LongBench %s row %d: skipped, %s", dataset, number, problem)
        else:
            rows.append(row)
    return rows


class LongBenchTask:
    """The given LongBench datasets (default: all 21 of v1) from ``data_dir`` or the hub."""

    name = "longbench"
    truncate = True

    def __init__(self, datasets: Sequence[str] | None = None, data_dir: str | Path | None = None):
        unknown = sorted(set(datasets or ()) - set(DATASETS))
        if unknown:
            raise ValueError(f"unknown LongBench datasets {unknown}; valid: {', '.join(DATASETS)}")
        self.datasets = list(datasets or DATASET2PROMPT)
        self.data_dir = Path(data_dir) if data_dir is not None else None

    def _rows(self, dataset: str) -> list[dict]:
        """The well-formed rows of one dataset (malformed ones are logged and skipped)."""
        if self.data_dir is None:
            return _hub_rows(dataset)
        path = self.data_dir / f"{dataset}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no LongBench file {path}")
        return _file_rows(path)

    def examples(self, tokenizer: PreTrainedTokenizerBase, seed: int) -> list[Example]:
        out = []
        for dataset in self.datasets:
            for row in self._rows(dataset):
                context, question = split_prompt(dataset, row)
                metadata = {"length": row["length"], "language": row["language"], "all_classes": row["all_classes"]}
                limit = DATASET2MAXLEN[base_name(dataset)]
                out.append(
                    Example(
                        f"longbench/{dataset}/{row['_id']}",
                        f"longbench/{dataset}",
                        context,
                        question,
                        tuple(row["answers"]),
                        limit,
                        metadata,
                    )
                )
        return out

    def score(self, example: Example, prediction: str) -> float:
        """LongBench's ``scorer``: first line only for the few-shot tasks, best score over the references."""
        dataset = base_name(example.task.split("/", 1)[1])
        if dataset in FIRST_LINE:
            prediction = prediction.lstrip("\n").split("\n")[0]
        metric = DATASET2METRIC[dataset]
        if metric is metrics.classification_score:
            metric = partial(metric, all_classes=example.metadata["all_classes"] or [])
        return max(metric(prediction, answer) for answer in example.answers)
