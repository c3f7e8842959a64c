"""A tiny benchmark, a tiny base model and LoRA adapters of it with random non-zero weights: models
that really differ, built in seconds, for tests, benchmarks and trying the app without training."""

from __future__ import annotations

from pathlib import Path


def tiny_models(root: Path, adapters: int = 2, players: int = 4) -> tuple[Path, Path, list[Path]]:
    """Writes root/data, root/base and root/adapter-<i> (seed i); returns (data, base, adapter dirs)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from offside.data.loader import load_benchmark
    from offside.data.synth import generate
    from offside.models.loading import ModelSpec, build_or_load, save

    data = Path(generate(str(root / "data"), players=players, seed=0))
    bench = load_benchmark(data)
    texts = [t for split in bench.values() for column in ("question", "answer") for t in split[column]]
    model, processor = build_or_load(ModelSpec("tiny"), texts, seed=0)
    base = root / "base"
    base.mkdir(parents=True)
    save(model, processor, base)
    dirs = []
    for seed in range(1, adapters + 1):
        model, _ = build_or_load(ModelSpec(str(base)))
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(root / f"adapter-{seed}")
        dirs.append(root / f"adapter-{seed}")
    return data, base, dirs


def merged(base: Path, adapter: Path, out: Path) -> Path:
    """The adapter merged into its base, saved as a plain model directory (what `offside eval` loads)."""
    from peft import PeftModel

    from offside.models.loading import ModelSpec, build_or_load, save

    model, processor = build_or_load(ModelSpec(str(base)))
    out.mkdir(parents=True)
    save(PeftModel.from_pretrained(model, str(adapter)), processor, out)
    return out
