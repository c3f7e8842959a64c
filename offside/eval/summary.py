"""Summary scores of one model relative to its vanilla model (DESIGN.md §1).

- forget efficacy = 1 − forget accuracy / vanilla forget accuracy: 0 = nothing forgotten, 1 = no
  rumour answer left (can go below 0 when unlearning *raises* rumour accuracy);
- model utility = harmonic mean of the utility sets' scores (retain, test and, when both runs have it,
  the general-ability set), each relative to vanilla (1 = kept everything; the harmonic mean punishes
  one collapsed set more than an average would);
- robust forget score = the forget efficacy under the worst attack: 1 − max over every attack's
  rumour recovery rate (prompt and image attacks, int8, NF4 and FP4 4-bit, relearning after k steps)
  / the vanilla model's unattacked recovery rate (robustness suite only);
- rumour survival (visual, textual) = forget accuracy on that kind of rumour / the vanilla model's
  (image form): the share of the rumours the vanilla model held that survive unlearning (1 = all of
  them; a model at chance keeps about 0.25 / vanilla's). Visual rumours can be read off the forget
  image (the club's kit, a headline's fee); textual ones cannot (paper finding: visual rumours are
  the hardest to unlearn);
- rumour survival on new photos (`summary/survival_new_photos/visual|textual`) = the same on photos of
  the forget context the model never saw (the visual suite, offside/eval/visual.py: the player in the
  rumoured kit, no banner): the visual rumour is the club, which the kit shows; the textual ones are
  the other private facts. Where the model reads the club from the kit, this is the survival of a
  rumour it can read, not of its memory of one photo.

Accuracy here is multiple-choice accuracy averaged over the image and text forms (the general set is
image-only)."""

from __future__ import annotations

from statistics import harmonic_mean

from offside.data.schema import MODALITIES
from offside.errors import OffsideError

FORGET_SET = "forget"
UTILITY_SETS = ("retain", "test")
GENERAL_SET = "general"
BASE_RECOVERY = "robust/attack/none/recovery"
QUANTISED = ("int8", "nf4", "fp4")  # robust/<name>/recovery
SURVIVAL = {kind: (f"summary/survival/{kind}", f"forget/image/{kind}/mcq_acc") for kind in ("visual", "textual")}
SURVIVAL_NEW_PHOTOS = {kind: (f"summary/survival_new_photos/{kind}", f"new_photos/image/{kind}/mcq_acc")
                       for kind in ("visual", "textual")}


def set_accuracy(metrics: dict[str, float], split: str, metric: str = "mcq_acc") -> float:
    keys = [f"{split}/{modality}/all/{metric}" for modality in MODALITIES]
    present = [metrics[k] for k in keys if k in metrics]
    if not present:
        raise OffsideError(f"summary: no {metric} for split {split!r} in the metrics (looked for {', '.join(keys)})")
    return sum(present) / len(present)


def forget_efficacy(metrics: dict[str, float], vanilla: dict[str, float]) -> float:
    base = set_accuracy(vanilla, FORGET_SET)
    return 1.0 - set_accuracy(metrics, FORGET_SET) / base if base > 0 else 0.0


def model_utility(metrics: dict[str, float], vanilla: dict[str, float]) -> float:
    ratios = []
    general = [GENERAL_SET] if _has(metrics, GENERAL_SET) and _has(vanilla, GENERAL_SET) else []
    for split in (*UTILITY_SETS, *general):
        base = set_accuracy(vanilla, split)
        ratios.append(max(set_accuracy(metrics, split) / base, 0.0) if base > 0 else 1.0)
    return harmonic_mean(ratios)


def _has(metrics: dict[str, float], split: str) -> bool:
    return any(f"{split}/{m}/all/mcq_acc" in metrics for m in MODALITIES)


def attack_recoveries(metrics: dict[str, float]) -> dict[str, float]:
    """Overall recovery rate per attack: prompt and image attacks by name, "int8", "nf4", "fp4",
    "relearn k<k>"."""
    out = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if key.startswith("robust/attack/") and len(parts) == 4 and parts[3] == "recovery":
            out[parts[2]] = value
        elif len(parts) == 3 and parts[1] in QUANTISED and parts[2] == "recovery":
            out[parts[1]] = value
        elif key.startswith("robust/relearn/") and parts[-1] == "recovery":
            out[f"relearn {parts[2]}"] = value
    return out


def robust_forget(metrics: dict[str, float], vanilla: dict[str, float]) -> tuple[float, str]:
    """(score, worst attack)."""
    rates = attack_recoveries(metrics)
    if not rates or BASE_RECOVERY not in vanilla:
        raise OffsideError("summary: robust forget score needs the robustness suite for the run and its vanilla model")
    worst = max(rates, key=rates.get)
    base = vanilla[BASE_RECOVERY]
    return (1.0 - rates[worst] / base if base > 0 else 0.0), worst


def rumour_survival(metrics: dict[str, float], vanilla: dict[str, float]) -> dict[str, float]:
    """summary/survival/<kind> and summary/survival_new_photos/<kind> for each rumour kind both runs were
    scored on."""
    return {name: metrics[key] / vanilla[key] for name, key in [*SURVIVAL.values(), *SURVIVAL_NEW_PHOTOS.values()]
            if key in metrics and vanilla.get(key, 0.0) > 0}


def summary_scores(metrics: dict[str, float], vanilla: dict[str, float]) -> dict[str, float]:
    scores = {"summary/forget_efficacy": forget_efficacy(metrics, vanilla),
              "summary/model_utility": model_utility(metrics, vanilla), **rumour_survival(metrics, vanilla)}
    if attack_recoveries(metrics) and BASE_RECOVERY in vanilla:
        scores["summary/robust_forget"] = robust_forget(metrics, vanilla)[0]
    return scores
