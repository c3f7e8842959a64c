"""Evaluation settings: plain data and their checks, importable without torch (the command line
checks a config against them before any heavy library loads). `evaluate.py` and `suites.py` run them."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from offside.data.schema import FORMS, MODALITIES, SPLITS
from offside.errors import OffsideError
from offside.models.spec import LoraSpec

MCQ_MODES = ("loglik", "generate")
FOUR_BIT_TYPES = ("nf4", "fp4")
ROBUSTNESS_ROWS = ("rumour", "all")


@dataclass
class EvalSpec:
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    forms: list[str] = field(default_factory=lambda: list(FORMS))
    mcq_mode: str = "loglik"  # loglik: option log-likelihood; generate: the published letter protocol
    batch_size: int = 64
    max_new_tokens: int = 32
    limit: int | None = None  # at most this many rows per split × modality × form


def check(spec: EvalSpec) -> None:
    for name, chosen, valid in (
        ("splits", spec.splits, SPLITS), ("modalities", spec.modalities, MODALITIES),
        ("forms", spec.forms, FORMS), ("mcq_mode", [spec.mcq_mode], MCQ_MODES),
    ):
        bad = [c for c in chosen if c not in valid]
        if bad:
            raise OffsideError(f"eval.{name}: unknown value(s) {bad} (valid: {', '.join(valid)})")


@dataclass
class LLMJudgeSpec:
    url: str = ""  # OpenAI-compatible API base; empty = no LLM judge
    model: str = ""
    timeout_s: float = 20.0
    cache: str = ""  # JSON cache file; empty = <eval out dir>/llm_judge_cache.json
    api_key_env: str = "OFFSIDE_JUDGE_API_KEY"  # name of the environment variable holding the key, if any


SUITES = ("efficacy", "generalization", "visual", "utility", "robustness")
CHEAP_SUITES = SUITES[:4]  # robustness (attacks, relearning, quantisation) costs minutes per model
SUITE_SPLITS = {"efficacy": ("forget", "relearn"), "generalization": ("test",), "utility": ("retain",)}


@dataclass
class UtilitySpec:
    general_scenes: int = 24  # scenes of the general-ability set (5 questions × 2 forms each)
    general_seed: int = 0
    external: list[str] = field(default_factory=list)  # "module:function" hooks


@dataclass
class RobustnessSpec:
    attacks: list[str] | None = None  # None = every registered attack
    rows: str = "rumour"  # rumour: forget rows with a rumour; all: every forget row
    limit: int | None = None  # at most this many forget rows
    quantise: bool = True  # int8
    four_bit: list[str] = field(default_factory=lambda: list(FOUR_BIT_TYPES))  # bitsandbytes types; [] = none
    relearn_steps: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    relearn_lr: float = 1e-3
    relearn_share: float = 0.25
    relearn_lora: LoraSpec | None = None  # the attacker's adapters; `offside eval` of a LoRA stage: its rank
    logit_lens: bool = True
    mia: bool = True
    llm_judge: LLMJudgeSpec = field(default_factory=LLMJudgeSpec)


def check_suites(suites: list[str], robustness: RobustnessSpec, attacks: Collection[str] | None = None) -> None:
    """Suite names and robustness settings; attack names too when the registry is given
    (`offside.eval.suites.check_suites` gives it)."""
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise OffsideError(f"suites: unknown {bad} (valid: {', '.join(SUITES)})")
    unknown = [a for a in robustness.attacks or [] if attacks is not None and a not in attacks]
    if unknown:
        raise OffsideError(f"robustness.attacks: unknown {unknown} (registered: {', '.join(attacks)})")
    if robustness.rows not in ROBUSTNESS_ROWS:
        raise OffsideError(f"robustness.rows: {robustness.rows!r} is not one of rumour, all")
    bad_types = [t for t in robustness.four_bit if t not in FOUR_BIT_TYPES]
    if bad_types:
        raise OffsideError(f"robustness.four_bit: unknown {bad_types} (valid: {', '.join(FOUR_BIT_TYPES)})")
    if robustness.llm_judge.url and not robustness.llm_judge.model:
        raise OffsideError("robustness.llm_judge.model: required when llm_judge.url is set")
