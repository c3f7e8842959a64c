"""ZeRO-3: a model whose weights are partitioned across the ranks of the process group, loaded so that
no rank ever holds the whole model.

`load_partitioned` builds the model inside DeepSpeed's `zero.Init`, which cuts each module's weights
into the ranks' partitions as the module is constructed (unfilled: no initialisation runs), then fills
each rank's partition straight from the safetensors files. DeepSpeed's partition of a weight is a
contiguous range of its flattened elements, so it is a contiguous byte range of the file, and a rank
reads exactly its bytes. No weight is ever gathered: a rank holds its share of the model, plus the
unfilled weight of the one module being constructed and a bounded read buffer.

transformers' own ZeRO-3 loading (an `HfDeepSpeedConfig` alive during `from_pretrained`) does not
give that: rank 0 reads the whole checkpoint into memory and every module is gathered whole on every
rank for rank 0 to fill it (`bench/memory_twin.py` measures both).

A partitioned model runs inside a DeepSpeed engine, whose hooks gather each module's weights as a
forward pass reaches it. Before the engine exists (the vanilla check before unlearning),
`gathered_per_module` does the same."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from offside.errors import OffsideError

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
READ_BYTES = 16 << 20  # a partition is read in pieces of at most this much, through one buffer


def partitioned(model) -> bool:
    """Whether the model's weights are ZeRO-3 partitions (DeepSpeed marks those parameters with ds_id)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def load_partitioned(path: Path, dtype: torch.dtype, ds_config: dict):
    """The Qwen2.5-VL model directory `path`, its weights in `dtype`, partitioned across the process
    group's ranks as the ZeRO-3 engine configured by `ds_config` partitions them. A collective: every
    rank calls it."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig

    files = _safetensors_files(path)
    model = _construct(Qwen2_5_VLConfig.from_pretrained(path), dtype, ds_config)
    _fill_partitions(model, files)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def _construct(config, dtype: torch.dtype, ds_config: dict):
    """The model with unfilled partitions. The body and an untied LM head are built inside `zero.Init`
    (with initialisation off: the files fill every weight); the wrapper around them on the meta
    device, so that a tied LM head (3B) never gets partitions of its own."""
    import deepspeed
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    class UnfilledInit(deepspeed.zero.Init):
        """zero.Init without its broadcast of rank 0's initial values of each new weight (a full
        tensor written on every other rank, and a collective per weight): these values are
        overwritten from the files."""

        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    text = config.get_text_config()
    with no_init_weights(), prevent_arange_dtype_change(), UnfilledInit(config_dict_or_path=ds_config, dtype=dtype):
        body = Qwen2_5_VLModel._from_config(config, dtype=dtype)
        head = None if config.tie_word_embeddings else torch.nn.Linear(text.hidden_size, text.vocab_size, bias=False)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.model = body
    if head is None:
        model.tie_weights()  # the LM head's weight is the embedding's
    else:
        model.lm_head = head
    return model


def merge_adapter(peft_model):
    """`merge_and_unload` for a PEFT model on a partitioned base: each adapted layer's base weight is
    gathered, merged (on every rank alike; rank 0's result is kept) and partitioned again, one layer at
    a time."""
    import deepspeed
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            with deepspeed.zero.GatheredParameters([module.get_base_layer().weight], modifier_rank=0):
                module.merge()
    return peft_model.unload()


@contextmanager
def gathered_per_module(model):
    """Lets a partitioned model that no DeepSpeed engine drives run forward passes: each module's own
    weights are gathered when a pass reaches it and partitioned again when it leaves. A collective per
    module: every rank must run the same passes (evaluation does not split rows across ranks under
    ZeRO-3, and generation steps in sync). A no-op for a model that is whole or inside an engine (whose
    hooks do this already: DeepSpeed numbers the modules it drives with ds_id)."""
    import deepspeed

    if not partitioned(model) or hasattr(model, "ds_id"):
        yield
        return
    opened: dict[int, list] = {}

    def gather(module, _args):
        context = deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)))
        context.__enter__()
        opened.setdefault(id(module), []).append(context)

    def release(module, _args, _output):
        opened[id(module)].pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        if any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)):
            handles += [module.register_forward_pre_hook(gather), module.register_forward_hook(release)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise OffsideError(f"{path}: ZeRO-3 loading reads safetensors weights, and the directory has none "
                       "(model.safetensors or model.safetensors.index.json)")


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's tensor table and where its data starts."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _fill_partitions(model, files: list[Path]) -> None:
    """Copies each rank's share of every weight from the files into its partition."""
    params = dict(model.named_parameters())  # a tied weight once, under its first name
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    rename = _checkpoint_names(model, set(params))
    filled = set()
    buffer = bytearray(READ_BYTES)
    for file in files:
        header, data_start = _header(file)
        with open(file, "rb") as f:
            for key, entry in header.items():
                name = rename(key)
                if name not in params:
                    if name in aliases:
                        continue  # the other name of a tied weight, stored twice
                    raise OffsideError(f"{file}: weight {key} is not a parameter of {type(model).__name__}")
                _read_partition(f, params[name], entry, data_start, buffer, f"{file}:{key}")
                filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise OffsideError(f"{files[0].parent}: the checkpoint lacks {len(missing)} weight(s), e.g. {missing[:3]}")


def _checkpoint_names(model, names: set[str]):
    """checkpoint key → parameter name, by transformers' own renaming for this model class (Qwen2.5-VL's
    published files say `model.layers.N…` and `visual.…` for `model.language_model.layers.N…` and
    `model.visual.…`)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    if any(not isinstance(t, WeightRenaming) for t in transforms):
        raise OffsideError(f"{type(model).__name__}: its checkpoints need converting, not only renaming; "
                           "ZeRO-3 partitioned loading supports renaming only")
    known = dict.fromkeys(names, True)
    return lambda key: rename_source_key(key, transforms, [], model.base_model_prefix, known)[0]


def _read_partition(f, param, entry: dict, data_start: int, buffer: bytearray, where: str) -> None:
    import torch.distributed as dist

    if tuple(entry["shape"]) != tuple(param.ds_shape):
        raise OffsideError(f"{where}: shape {tuple(entry['shape'])} in the file, {tuple(param.ds_shape)} in the model")
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise OffsideError(f"{where}: dtype {entry['dtype']} is not one of {', '.join(SAFETENSORS_DTYPES)}")
    stored = SAFETENSORS_DTYPES[entry["dtype"]]
    partition = param.ds_tensor
    size = partition.ds_numel
    start = size * dist.get_rank(group=param.ds_process_group)
    count = max(0, min(size, param.ds_numel - start))  # the last partition is padded
    itemsize = torch.empty((), dtype=stored).element_size()
    step = len(buffer) // itemsize
    for done in range(0, count, step):
        n = min(step, count - done)
        f.seek(data_start + entry["data_offsets"][0] + (start + done) * itemsize)
        if f.readinto(memoryview(buffer)[: n * itemsize]) != n * itemsize:
            raise OffsideError(f"{where}: the file ends before the weight does")
        partition[done : done + n].copy_(torch.frombuffer(buffer, dtype=stored, count=n))
