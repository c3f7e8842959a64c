"""The four test sets as named suites (DESIGN.md §1):

- `efficacy`: the forget set (and relearn: the true facts of the same contexts);
- `generalization`: the test set;
- `visual`: the forget players on photos never seen, in the rumoured kit and in each offered club's
  kit (offside/eval/visual.py: `new_photos/…`, `kit_swap/…`, `visual/<form>/kit_following`,
  `visual/<form>/rumour_in_new_photos`, …); synthetic benchmarks only (skipped with a note otherwise);
- `utility`: the retain set + the general-ability set (`offside/data/general.py`, keys
  `general/image/<category>/<metric>`) + any external suites (see `ExternalHook`);
- `robustness`: prompt and image attacks on the forget set's rumour rows
  (`robust/attack/<name>/recovery`, by form, modality and rumour kind too; image attacks on image
  rows only), int8 and bitsandbytes 4-bit quantisation (`robust/int8/recovery`,
  `robust/nf4/recovery`, `robust/fp4/recovery`), the relearning recovery
  curve (`robust/relearn/k<k>/recovery`), the logit-lens probe
  (`robust/logit_lens/layer<i>/mean_rank`), membership inference (`privacy/mia_auc`) and, when
  configured, the LLM judge (`judge_llm/<attack>/...`).

Split suites keep the keys of `evaluate` (`<split>/<modality>/<group>/<metric>`).

External suites for real models: `utility.external` lists hooks "module:function"; each is called as
`function(model, processor)` and returns {name: float}, recorded as `external/<module:function>/<name>`
(e.g. a wrapper that runs MMBench through an installed evaluation toolkit). A hook that raises is
reported in the suite notes and its metrics are absent.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from offside.data.general import general_rows
from offside.eval.attacks import ATTACKS, recovery_rates, run_attacks
from offside.eval.evaluate import EvalSpec, check, evaluate, score_rows
from offside.eval.llm_judge import LLMJudge, judge_records
from offside.eval.robustness import (four_bit_backend, logit_lens, mia_auc, quantised_4bit,
                                     quantised_int8, relearning_curve)
from offside.eval.spec import (CHEAP_SUITES, SUITE_SPLITS, SUITES, RobustnessSpec, UtilitySpec,  # noqa: F401  (re-exported)
                               check_suites as check_suite_settings)
from offside.eval.visual import visual_suite

@dataclass
class SuiteResult:
    metrics: dict[str, float]
    predictions: list[dict]
    attack_records: list[dict]
    notes: list[str]
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per attack (prompt, image, quantised)


def check_suites(suites: list[str], robustness: RobustnessSpec) -> None:
    """`offside.eval.spec.check_suites` with the attack names checked against the registry."""
    check_suite_settings(suites, robustness, ATTACKS)


def run_suites(model, processor, rows: dict[str, list[dict]], suites: list[str], spec: EvalSpec,
               utility: UtilitySpec, robustness: RobustnessSpec, out_dir: Path, progress: bool = True,
               data_dir: str | os.PathLike | None = None) -> SuiteResult:
    """`data_dir`: the benchmark's directory, where the visual suite redraws its photos from."""
    check(spec)
    check_suites(suites, robustness)
    result = SuiteResult({}, [], [], [])
    splits = [s for s in spec.splits if any(s in SUITE_SPLITS.get(suite, ()) for suite in suites)]
    if splits:
        metrics, predictions = evaluate(model, processor, rows, _with_splits(spec, splits), progress)
        result.metrics |= metrics
        result.predictions += predictions
    if "visual" in suites:
        metrics, predictions, notes = visual_suite(model, processor, rows.get("forget", []), data_dir, spec)
        result.metrics |= metrics
        result.predictions += predictions
        result.notes += notes
    if "utility" in suites:
        _utility(model, processor, spec, utility, result)
    if "robustness" in suites:
        _robustness(model, processor, rows, spec, robustness, out_dir, result, progress)
    result.metrics = dict(sorted(result.metrics.items()))
    return result


def _with_splits(spec: EvalSpec, splits: list[str]) -> EvalSpec:
    return EvalSpec(**{**spec.__dict__, "splits": splits})


def _utility(model, processor, spec: EvalSpec, utility: UtilitySpec, result: SuiteResult) -> None:
    if utility.general_scenes > 0:
        general = general_rows(utility.general_scenes, utility.general_seed)
        model.eval()
        for form in spec.forms:
            metrics, predictions = score_rows(model, processor, "general", "image", form,
                                              [r for r in general if r["form"] == form], spec)
            result.metrics |= metrics
            result.predictions += predictions
    for hook in utility.external:
        try:
            module, _, name = hook.partition(":")
            scores = getattr(importlib.import_module(module), name)(model, processor)
            result.metrics |= {f"external/{hook}/{k}": float(v) for k, v in scores.items()}
        except Exception as err:  # an external toolkit's failure must not lose the run
            result.notes.append(f"utility.external {hook!r} failed: {type(err).__name__}: {err}")


def attack_rows(rows: dict[str, list[dict]], robustness: RobustnessSpec) -> list[dict]:
    forget = rows.get("forget", [])
    if robustness.rows == "rumour":
        forget = [r for r in forget if r.get("rumour_kind") in ("visual", "textual")]
    return forget[: robustness.limit]


def _robustness(model, processor, rows, spec: EvalSpec, robustness: RobustnessSpec, out_dir: Path, result: SuiteResult,
                progress: bool = True) -> None:
    forget = [r for r in attack_rows(rows, robustness) if r["modality"] in spec.modalities and r["form"] in spec.forms]
    if not forget:
        result.notes.append("robustness: no forget rows to attack")
        return
    model.eval()
    examples = [r for r in rows.get("retain", []) if r["form"] == "gen" and r["modality"] == "text"][:3]
    names = list(ATTACKS) if robustness.attacks is None else robustness.attacks
    records = []
    for i, name in enumerate(names, 1):  # one attack at a time, so the terminal shows where the suite is
        records += run_attacks(model, processor, forget, [name], examples=examples,
                               batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens, timings=result.timings)
        _progress(progress, f"attack {i}/{len(names)} {name}: {result.timings[name]:.1f}s")
    result.attack_records += records
    result.metrics |= _rates("robust/attack", records)
    quantisers = {"int8": quantised_int8} if robustness.quantise else {}
    if robustness.four_bit and four_bit_backend() is None:
        result.notes.append("robustness: 4-bit quantisation skipped: bitsandbytes is not installed")
    elif robustness.four_bit:
        quantisers |= {t: lambda m, t=t: quantised_4bit(m, t) for t in robustness.four_bit}
    for name, quantise in quantisers.items():
        start = time.perf_counter()
        unattacked = run_attacks(quantise(model), processor, forget, ["none"], batch_size=spec.batch_size,
                                 max_new_tokens=spec.max_new_tokens)
        result.metrics |= {k.replace(f"robust/{name}/none", f"robust/{name}"): v for k, v in _rates(f"robust/{name}", unattacked).items()}
        result.timings[name] = time.perf_counter() - start
        _progress(progress, f"{name} quantisation: {result.timings[name]:.1f}s")
    result.notes.append("robustness: wall seconds per attack: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    if robustness.logit_lens:
        ranks = logit_lens(model, processor, [r for r in forget if r["form"] == "gen"])
        result.metrics |= {f"robust/logit_lens/layer{layer}/mean_rank": v for layer, v in ranks.items()}
    if robustness.mia and rows.get("test"):
        members = [r for r in rows["forget"] if r["form"] == "gen"]
        outsiders = [r for r in rows["test"] if r["form"] == "gen"]
        result.metrics["privacy/mia_auc"] = mia_auc(model, processor, members, outsiders)
    if robustness.relearn_steps:
        _progress(progress, f"relearning attack: {max(robustness.relearn_steps)} steps")
        curve = relearning_curve(model, processor, forget, robustness.relearn_steps, robustness.relearn_lr,
                                 robustness.relearn_share, seed=0, lora=robustness.relearn_lora)
        result.metrics |= {f"robust/relearn/k{k}/recovery": v for k, v in curve.items()}
    if robustness.llm_judge.url:
        cache = Path(robustness.llm_judge.cache or out_dir / "llm_judge_cache.json")
        judge = LLMJudge(robustness.llm_judge, cache, os.environ.get(robustness.llm_judge.api_key_env))
        result.metrics |= judge_records(judge, records, {r["id"]: r for r in forget})
        failed = sum(1 for r in records if r.get("llm_error"))
        if failed:
            result.notes.append(f"llm judge: {failed} of {len(records)} items not scored (see attacks.jsonl llm_error)")


def _progress(enabled: bool, message: str) -> None:
    if enabled:
        from tqdm.auto import tqdm

        tqdm.write(f"  robustness: {message}")


def _rates(prefix: str, records: list[dict]) -> dict[str, float]:
    """<prefix>/<attack>/recovery, …/<gen|mcq>/recovery, …/<image|text>/recovery and
    …/<visual|textual>/recovery."""
    out = {f"{prefix}/{a}/recovery": v for a, v in recovery_rates(records).items()}
    for key, value in (("form", "gen"), ("form", "mcq"), ("modality", "image"), ("modality", "text")):
        subset = [r for r in records if r[key] == value]
        out |= {f"{prefix}/{a}/{value}/recovery": v for a, v in recovery_rates(subset).items()}
    for kind in ("visual", "textual"):
        out |= {f"{prefix}/{a}/{kind}/recovery": v for a, v in recovery_rates(records, kind).items()}
    return out
