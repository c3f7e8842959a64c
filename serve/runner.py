"""Models in one replica and the batched model calls. No Ray here.

Each base model is loaded once; adapters of that base are attached to one shared PEFT model and a
batch may mix them in one forward pass (`adapter_names`, one per row). Full-weight models are their
own group. Probe answers come from `offside.eval.scoring` — the code `offside eval` runs — so a probe
answers exactly as the evaluation scores; generation (chat, completions) and prompt scoring (`echo`)
from `serve.chat`."""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass

import torch

from offside.eval.scoring import generate, option_logliks
from offside.models.loading import ModelSpec, build_or_load
from serve.chat import GenerateJob, ScoreJob, complete, prompt_logprobs
from serve.settings import ModelEntry

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class Job:
    """One question for one model: `options` → multiple choice (log-likelihoods), else generation."""

    model: str
    question: str
    image: object = None  # PIL image or None
    options: list[str] | None = None
    max_tokens: int = 32


class _Base:
    """A base model shared by its adapters."""

    def __init__(self, spec: ModelSpec):
        self.model, self.processor = build_or_load(spec)
        self.model.eval()
        self.peft = None  # PeftModel once the first adapter arrives
        self.vision_adapters: set[str] = set()  # adapters with LoRA in the vision tower or projector

    def attach(self, adapter_name: str, adapter_dir: str) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, adapter_dir, adapter_name=adapter_name,
                                                  autocast_adapter_dtype=False)  # the model's dtype, as trained
        else:
            self.peft.load_adapter(adapter_dir, adapter_name=adapter_name, autocast_adapter_dtype=False)
        # After every adapter was deleted PEFT keeps a stale active name; point it at a live one.
        self.peft.set_adapter(adapter_name)
        self.peft.eval()
        if any(".visual." in name and adapter_name in getattr(module, "lora_A", {}) for name, module in self.peft.named_modules()):
            self.vision_adapters.add(adapter_name)

    def detach(self, adapter_name: str) -> None:
        if self.peft is not None and adapter_name in self.peft.peft_config:
            self.peft.delete_adapter(adapter_name)
            self.vision_adapters.discard(adapter_name)


class LoadedModel:
    """What the multiplexed cache holds. Eviction calls `__del__`, which detaches the adapter."""

    def __init__(self, entry: ModelEntry, spec: ModelSpec | None = None, base: _Base | None = None,
                 adapter_name: str | None = None):
        self.entry, self.base, self.adapter_name = entry, base, adapter_name
        self.model, self.processor = (None, base.processor) if base else build_or_load(spec)
        if self.model is not None:
            self.model.eval()

    def __del__(self):
        if sys.is_finalizing():
            return  # PEFT cannot delete adapters while the interpreter tears its modules down
        if self.base is not None and self.adapter_name is not None:
            self.base.detach(self.adapter_name)
            self.adapter_name = None


class _Mixed:
    """A PEFT model seen by the scoring functions as one model whose rows each use their own adapter.
    Row counts that are a multiple of the adapter list (options repeated per row) repeat the names.
    PEFT mixes adapters per row only in modules whose inputs are rows; the vision tower's are image
    patches, so a batch with a vision adapter holds that adapter alone and runs it as the active one."""

    def __init__(self, peft, names: list[str]):
        self.peft, self.names = peft, names

    def _adapter_args(self, inputs: dict) -> dict:
        if len(set(self.names)) == 1:
            self.peft.set_adapter(self.names[0])
            return {}
        repeat = inputs["input_ids"].shape[0] // len(self.names)
        return {"adapter_names": [n for n in self.names for _ in range(repeat)]}

    def __call__(self, **inputs):
        return self.peft(**inputs, **self._adapter_args(inputs))

    def generate(self, **inputs):
        return self.peft.generate(**inputs, **self._adapter_args(inputs))

    def parameters(self):
        return self.peft.parameters()

    @property
    def training(self) -> bool:
        return self.peft.training

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self  # served models stay in eval mode (adapter mixing requires it)

    def get_base_model(self):
        return self.peft.base_model.model


class ModelPool:
    """The replica's models, all in one dtype on one device (the replica's GPU, or its CPU)."""

    def __init__(self, entries: dict[str, ModelEntry], dtype: str = "fp32", device: str = "auto"):
        self.entries, self.dtype, self.device = entries, dtype, device
        self.bases: dict[str, _Base] = {}
        self._adapter_ids = {name: f"adapter_{i}" for i, name in enumerate(sorted(entries))}  # PEFT-safe names

    def load(self, name: str) -> LoadedModel:
        entry = self.entries[name]
        if entry.base is None:
            return LoadedModel(entry, self._spec(entry.path))
        base = self.bases.get(entry.base) or self.bases.setdefault(entry.base, _Base(self._spec(entry.base)))
        adapter_name = self._adapter_ids[name]
        base.attach(adapter_name, entry.path)
        return LoadedModel(entry, base=base, adapter_name=adapter_name)

    def _spec(self, path: str) -> ModelSpec:
        return ModelSpec(name=path, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def run(self, jobs: list[Job | GenerateJob | ScoreJob], loaded: dict[str, LoadedModel]) -> list[dict]:
        """Answers in job order; `loaded` holds every job's model (kept alive by the caller). Generation
        rows end on their own, so generation jobs of any length share one `generate`."""
        results: list[dict | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            model = loaded[job.model]
            owner = id(model.base) if model.base else id(model)
            if model.base and model.adapter_name in model.base.vision_adapters:
                owner = (owner, model.adapter_name)
            groups[(owner, *_kind(job))].append(i)
        for indices in groups.values():
            group = [jobs[i] for i in indices]
            runner, processor = _runner([loaded[j.model] for j in group])
            for i, result in zip(indices, _answer(runner, processor, group)):
                results[i] = result
        return results


def _kind(job) -> tuple:
    """What jobs must share to run in one model call."""
    if isinstance(job, GenerateJob):
        return ("generate",)
    if isinstance(job, ScoreJob):
        return ("score",)
    return ("probe", len(job.options) if job.options else 0, job.max_tokens)


def runner_for(model: LoadedModel):
    """(model, processor) for library functions that take one model, e.g. the prompt attacks."""
    return _runner([model])


def _runner(models: list[LoadedModel]):
    first = models[0]
    if first.base is None:
        return first.model, first.processor
    return _Mixed(first.base.peft, [m.adapter_name for m in models]), first.processor


def _answer(runner, processor, jobs: list) -> list[dict]:
    if isinstance(jobs[0], GenerateJob):
        return complete(runner, processor, jobs)
    if isinstance(jobs[0], ScoreJob):
        return prompt_logprobs(runner, processor, jobs)
    if jobs[0].options:
        rows = [{"question": j.question, "image": j.image, "options": j.options} for j in jobs]
        scores = option_logliks(runner, processor, rows, batch_size=len(rows))
        return [{"logliks": s, "choice": max(range(len(s)), key=s.__getitem__)} for s in scores]
    answers = generate(runner, processor, [j.question for j in jobs], [j.image for j in jobs],
                       batch_size=len(jobs), max_new_tokens=jobs[0].max_tokens)
    return [{"answer": a} for a in answers]
