"""Multi-adapter serving: every adapter (NEAT or LoRA) as low-rank factors computed once at load time
(`factors`), one frozen base model running a batch whose rows use different adapters (`batched`), a byte-bounded
adapter cache (`cache`), and the engine that batches concurrent requests and streams tokens (`engine`: its
`scheduler`, `generation` and `classification` parts)."""

from neat_core.serving.batched import MultiAdapterLinear, MultiAdapterModel
from neat_core.serving.cache import AdapterAccessError, AdapterCache, AdapterRef
from neat_core.serving.classification import length_buckets
from neat_core.serving.engine import BatchEngine
from neat_core.serving.factors import AdapterFactors, load_factors
from neat_core.serving.generation import KV_CACHE, SamplingParams, TokenStream
from neat_core.serving.grammar import GrammarError
from neat_core.serving.scheduler import EngineBusy, EngineClosed

__all__ = [
    "KV_CACHE",
    "AdapterAccessError",
    "AdapterCache",
    "AdapterFactors",
    "AdapterRef",
    "BatchEngine",
    "EngineBusy",
    "EngineClosed",
    "GrammarError",
    "MultiAdapterLinear",
    "MultiAdapterModel",
    "SamplingParams",
    "TokenStream",
    "length_buckets",
    "load_factors",
]
