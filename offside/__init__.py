"""OFFSIDE: a benchmark and experiment service for unlearning misinformation in multimodal LLMs.

The stages as Python functions, with the command line's defaults (offside/api.py):
`offside.synth`, `load_benchmark`, `finetune`, `unlearn`, `relearn`, `evaluate`, `run_matrix`,
`make_report`, `findings`, `export`. They load lazily, so `import offside` stays light."""

__version__ = "0.1.0"

API = ("synth", "load_benchmark", "finetune", "unlearn", "relearn", "evaluate", "run_matrix", "make_report",
       "findings", "export")
__all__ = [*API, "OffsideError", "__version__"]


def __getattr__(name: str):
    if name in API:
        from offside import api

        return getattr(api, name)
    if name == "OffsideError":
        from offside.errors import OffsideError

        return OffsideError
    raise AttributeError(f"module 'offside' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *API, "OffsideError"])
