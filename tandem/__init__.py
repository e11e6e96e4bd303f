"""Tandem: a pipeline- and tensor-parallel LLM inference engine.

`from tandem import Engine` is the offline API; `tandem serve` the OpenAI-compatible server."""

__all__ = ["Engine", "EngineArgs", "SamplingParams"]


def __getattr__(name: str):
    # lazy, so that `import tandem` (e.g. in a rank process or `tandem --help`) stays cheap
    if name == "Engine":
        from tandem.engine import Engine

        return Engine
    if name == "EngineArgs":
        from tandem.config import EngineArgs

        return EngineArgs
    if name == "SamplingParams":
        from tandem.runtime.sampling.params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
