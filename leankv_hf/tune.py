"""The orchestrator: turn a memory budget into a plan by measuring, not guessing.

``tune`` runs every candidate `UnifiedLeanCache` configuration (capped at ``budget_mb``) over the same
calibration window, teacher-forced, against the full cache's distributions computed once; it keeps the candidates
that fit the budget (and the latency limit, if any) and picks the lowest mean KL(full || candidate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .caches.unified import PRESETS, LeanKVConfig, UnifiedLeanCache
from .eval.report import markdown_table
from .eval.tasks.perplexity import reference_logprobs, teacher_forced
from .monitor import cache_nbytes, dense_nbytes

CALIBRATION_TEXT = Path(__file__).parent / "data" / "python_reference.txt"

# name -> settings: the presets, and tier splits around the reference thresholds.
DEFAULT_CANDIDATES: dict[str, dict] = {
    **{name: {"preset": name} for name in PRESETS},
    "k8v8/k4v4": {"high": (8, 8), "low": (4, 4)},
    "k8v4/k4v2": {"high": (8, 4), "low": (4, 2)},
    "k4v4/k2v2": {"high": (4, 4), "low": (2, 2)},
    "k8v4/k4v2,ap0.1": {"high": (8, 4), "low": (4, 2), "alpha_prune": 0.1},
    "k8v4/k4v2,rank0.5": {"high": (8, 4), "low": (4, 2), "rank": 0.5},
}


@dataclass(frozen=True)
class Trial:
    """One candidate's measurements on the calibration window."""

    name: str
    settings: dict
    kl: float  # mean per token, nats
    delta_nll: float  # mean per token, vs the full cache
    peak_mb: float  # stored bytes after the prefill or at the end, whichever is larger (MiB)
    compression: float  # 16-bit dense bytes / stored bytes, at the end
    ms_per_token: float
    fits: bool


@dataclass(frozen=True)
class Plan:
    """What `tune` searched and what it chose (``best`` is None when nothing fits)."""

    trials: list[Trial]
    best: Trial | None
    budget_mb: float
    context: int

    def to_markdown(self) -> str:
        header = ("", "candidate", "KL(full‖cand)", "Δnll", "peak MiB", "compression ×", "decode ms/tok", "fits")
        rows = [
            ("→" if t is self.best else "", t.name, t.kl, t.delta_nll, t.peak_mb, t.compression, t.ms_per_token, t.fits)
            for t in sorted(self.trials, key=lambda t: (not t.fits, t.kl))
        ]
        return markdown_table(header, rows)

    def to_dict(self) -> dict:
        return {
            "budget_mb": self.budget_mb,
            "context": self.context,
            "best": self.best and self.best.name,
            "trials": [asdict(t) for t in self.trials],
        }

    def best_config(self) -> LeanKVConfig | None:
        """The chosen candidate as a config (preset resolved, budget cap included), ready for ``from_config``."""
        if self.best is None:
            return None
        settings = dict(self.best.settings)
        preset = PRESETS.get(settings.pop("preset", None), {})
        return LeanKVConfig.from_dict({**preset, **settings, "budget_mb": self.budget_mb})


def calibration_ids(tokenizer: PreTrainedTokenizerBase, text: str, length: int) -> list[int]:
    """The first ``length`` tokens of ``text``; too short a text is an error, never silently a shorter window."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < length:
        raise ValueError(f"the calibration text has {len(ids)} tokens; --context plus --steps needs {length}")
    return ids[:length]


def tune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    budget_mb: float,
    context: int = 2048,
    steps: int = 64,
    text: str | None = None,
    candidates: dict[str, dict] | None = None,
    max_latency_ms: float | None = None,
    progress: bool = True,
) -> Plan:
    """Measure each candidate (a `UnifiedLeanCache` settings dict, capped at ``budget_mb``) over ``context``
    prompt tokens and ``steps`` teacher-forced ones; choose the lowest KL among those that fit.

    Example:
        >>> from leankv_hf.testing import tiny_model, tiny_tokenizer
        >>> from leankv_hf.tune import tune
        >>> plan = tune(tiny_model("llama"), tiny_tokenizer(), budget_mb=1.0, context=96, steps=4,
        ...             text="hello world " * 100, candidates={"leankv": {"group_size": 16}}, progress=False)
        >>> [t.name for t in plan.trials]
        ['leankv']
    """
    if budget_mb <= 0:
        raise ValueError(f"budget_mb={budget_mb!r} must be > 0")
    if context < 1 or steps < 1:
        raise ValueError(f"context={context} and steps={steps} must both be >= 1")
    candidates = DEFAULT_CANDIDATES if candidates is None else candidates
    caches = {
        name: lambda s=settings: UnifiedLeanCache(model, **{**s, "budget_mb": budget_mb})
        for name, settings in candidates.items()
    }
    for make in caches.values():
        make()  # a bad candidate fails before any measurement
    ids = calibration_ids(tokenizer, CALIBRATION_TEXT.read_text() if text is None else text, context + steps)
    reference = reference_logprobs(model, ids, context)
    full_nll = -reference[torch.arange(steps), ids[context:]].sum().item()

    from tqdm.auto import tqdm

    trials = []
    for name, make in tqdm(caches.items(), desc="tune", disable=not progress):
        cache = make()
        sizes = []
        result = teacher_forced(
            model,
            ids,
            context,
            cache,
            reference=reference,
            after_prefill=lambda c=cache, s=sizes: s.append(cache_nbytes(c)),
        )
        sizes.append(cache_nbytes(cache))
        peak = max(sizes)
        ms = 1000 * result.decode_s / max(result.tokens - 1, 1)
        fits = peak <= budget_mb * 2**20 and (max_latency_ms is None or ms <= max_latency_ms)
        trials.append(
            Trial(
                name=name,
                settings=dict(candidates[name]),
                kl=result.kl / result.tokens,
                delta_nll=(result.nll - full_nll) / result.tokens,
                peak_mb=peak / 2**20,
                compression=dense_nbytes(cache) / sizes[-1],
                ms_per_token=ms,
                fits=fits,
            )
        )
    fitting = [t for t in trials if t.fits]
    best = min(fitting, key=lambda t: t.kl) if fitting else None
    return Plan(trials, best, budget_mb, context)


def run_tune_command(args) -> int:
    """``leankv tune``: print the searched table, write it with the chosen config to ``--out``."""
    import json

    from .eval.results import write_atomic
    from .models import load_model

    text = Path(args.text).read_text() if args.text else None
    candidates = None
    if args.candidates:
        import yaml

        candidates = yaml.safe_load(Path(args.candidates).read_text())
        if not isinstance(candidates, dict) or not all(isinstance(v, dict) for v in candidates.values()):
            raise ValueError(f"{args.candidates} must map candidate names to UnifiedLeanCache settings")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    plan = tune(model, tokenizer, args.budget_mb, args.context, args.steps, text, candidates, args.max_latency_ms)
    table = plan.to_markdown()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "tune.md", f"# leankv tune --budget-mb {args.budget_mb} --context {args.context}\n\n{table}")
    write_atomic(out / "tune.json", json.dumps(plan.to_dict(), indent=2) + "\n")
    best = plan.best_config()
    if best is None:
        print(
            f"no candidate fits {args.budget_mb} MB"
            + (f" and {args.max_latency_ms} ms/token" if args.max_latency_ms else "")
        )
        return 1
    write_atomic(out / "best.yaml", best.to_yaml())
    print(f"chose {plan.best.name}: UnifiedLeanCache.from_config('{out / 'best.yaml'}', model=model)")
    return 0
