"""How much memory a training job needs, estimated before anything is loaded: torch-free, so a worker can refuse a
job that cannot fit at claim time, without importing torch or reading a weight.

The parameter count comes from the model's config.json (`parameters_from_config`): hidden size, layers, vocabulary,
intermediate size, heads. For a catalog model shipped as GGUF and not yet converted, the GGUF file's tensor table
is read instead (exact, and still no weights: `gguf` parses the header only).

Activation checkpointing (`resolve_gradient_checkpointing`) is decided here too, on the same parameter count, so
the estimate and the training loop agree on whether it is on.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from neat_core.errors import InvalidHyperparameterError

AUTO = "auto"

# "auto" turns activation checkpointing on from this many base-model parameters. Checkpointing trades one extra
# forward pass per step (+46% step time on SmolLM2, for 1.7x less peak memory at 8 x 512 tokens: docs/benchmarks.md,
# "Activation checkpointing") for keeping one (B, T, h) tensor per layer instead of every intermediate. Below ~1B
# parameters the auto batch (8 x 512 tokens) fits a 16 GB GPU without it (SmolLM2: 8.8 GB in fp32, less under
# bf16), and paying half as much time again buys nothing; from ~1B (hidden 2048, 16-24 layers, e.g. Llama-3.2-1B,
# Qwen2.5-1.5B) the activations at that batch are several GB and exceed the fp32 weights themselves, so memory,
# not time, is what limits a job.
CHECKPOINTING_MIN_PARAMETERS = 1_000_000_000

FP32 = 4  # bytes: base weights on a CPU (bf16, 2, on GPUs: neat_core.devices.base_weights_dtype); adapters always
ADAM_BYTES_PER_TRAINABLE = 4 * FP32  # weight, gradient, AdamW's two moments
# Activation elements the backward pass keeps per token per transformer layer, in units of the hidden size h and
# the intermediate size i: layer-norm inputs and outputs, q/k/v/attention output, residuals (~10 h), and the MLP's
# up/gate/activation/product (4 i). Fitted to SmolLM2 at 8 x 512 tokens on CPU (bench/activation_checkpointing.py
# measures the real peak; the estimate is compared there).
ACT_H, ACT_I = 10, 4
# causal LM, each (B, T, V) fp32: the logits, the loss's log-softmax (kept for its backward), and in the backward
# the gradients of both
LOGIT_COPIES = 4


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config."""

    parameters: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, by part; `total` is what is compared with the device's memory."""

    weights: int
    adapter: int  # adapter weights, gradients and AdamW state
    activations: int
    gradient_checkpointing: bool
    parameters: int
    batch_size: int
    seq_len: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations

    def describe(self) -> str:
        checkpointing = "on" if self.gradient_checkpointing else "off"
        return (
            f"{gib(self.total)} (base weights {gib(self.weights)} for {self.parameters / 1e6:.1f}M parameters, "
            f"adapter and optimiser {gib(self.adapter)}, activations {gib(self.activations)} at batch "
            f"{self.batch_size} x {self.seq_len} tokens, activation checkpointing {checkpointing})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def auto_batch_size(task: str, n_examples: int) -> int:
    """The batch size "auto" resolves to (neat_core.train.spec.resolve_schedule): 16 rows for classification, 8
    for a causal LM, never more than the examples."""
    return min(16 if task == "classification" else 8, n_examples)


def auto_max_seq_len(task: str) -> int:
    """The longest sequence "auto" trains on (tokens; longer examples are truncated)."""
    return 128 if task == "classification" else 512


def resolve_gradient_checkpointing(value: bool | str, parameters: int) -> bool:
    """`"auto"`: on from CHECKPOINTING_MIN_PARAMETERS base parameters; `True`/`False` as given."""
    if value == AUTO:
        return parameters >= CHECKPOINTING_MIN_PARAMETERS
    if isinstance(value, bool):
        return value
    raise InvalidHyperparameterError("gradient_checkpointing", f"invalid value {value!r}", "'auto', true or false")


def _first(config: dict, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def shape_from_config(config: dict) -> ModelShape:
    """The parameter count of the transformers model `config` (config.json as a dict) describes, by family:
    BERT-style encoders, GPT-2, and Llama-style decoders (Llama, Mistral, Qwen2, Gemma...: any config with
    `num_key_value_heads` or a gated MLP); anything else gets the Llama-style count, a fair guess for a decoder.
    Classification heads (a few thousand parameters) are left out."""
    config = {**config, **(config.get("text_config") or {})}  # multimodal configs nest the language model's
    h = int(_first(config, "hidden_size", "n_embd", "d_model"))
    layers = int(_first(config, "num_hidden_layers", "n_layer", "num_layers"))
    vocab = int(_first(config, "vocab_size", default=32000))
    heads = int(_first(config, "num_attention_heads", "n_head", default=max(1, h // 64)))
    kind = config.get("model_type", "")
    if kind in ("bert", "roberta", "xlm-roberta", "electra", "distilbert"):
        i = int(_first(config, "intermediate_size", "hidden_dim", default=4 * h))
        positions = int(_first(config, "max_position_embeddings", default=512))
        types = int(_first(config, "type_vocab_size", default=0 if kind == "distilbert" else 2))
        embeddings = (vocab + positions + types) * h + 2 * h  # + embedding LayerNorm
        per_layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h  # q,k,v,o with biases; MLP; two LayerNorms
        pooler = h * h + h if kind in ("bert", "roberta", "xlm-roberta") else 0
        return ModelShape(embeddings + layers * per_layer + pooler, h, layers, i, vocab)
    if kind == "gpt2":
        i = int(_first(config, "n_inner", default=4 * h))
        positions = int(_first(config, "n_positions", default=1024))
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h  # c_attn c_proj fc proj, LNs
        return ModelShape((vocab + positions) * h + layers * per_layer + 2 * h, h, layers, i, vocab)
    # Llama-style: grouped-query attention, gated MLP (gate, up, down), RMSNorms, untied head unless tied.
    i = int(_first(config, "intermediate_size", default=4 * h))
    head_dim = int(_first(config, "head_dim", default=h // heads))
    kv_heads = int(_first(config, "num_key_value_heads", default=heads))
    q, kv = heads * head_dim, kv_heads * head_dim
    bias = q + 2 * kv if config.get("attention_bias") or kind == "qwen2" else 0  # Qwen2 has q/k/v biases
    per_layer = h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h
    head = 0 if config.get("tie_word_embeddings", True) else vocab * h
    return ModelShape(vocab * h + layers * per_layer + h + head, h, layers, i, vocab)


def parameters_from_config(config: dict) -> int:
    return shape_from_config(config).parameters


def _gguf_shape(path: Path) -> ModelShape:
    """A GGUF file's exact parameter count (its tensor table) and its shape (its metadata), without its weights."""
    from gguf import GGUFReader  # numpy only; the worker image has it (transformers reads GGUF with it)

    reader = GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def field(name: str) -> int:
        return int(reader.fields[f"{arch}.{name}"].parts[-1][0])

    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    parameters = sum(int(t.n_elements) for t in reader.tensors)
    return ModelShape(parameters, field("embedding_length"), field("block_count"), field("feed_forward_length"), vocab)


def model_shape(model_id: str, cache_dir: Path | None = None) -> ModelShape | None:
    """`model_id`'s shape without loading it: a local directory's or a catalog package's config.json, a converted
    catalog model's cached config.json, or its GGUF file's header. None when none of these can be read."""
    from neat_core.models.catalog import entry, local_model_dir, package_dir

    def read(directory: Path) -> ModelShape:
        return shape_from_config(json.loads((directory / "config.json").read_text()))

    found = entry(model_id)
    try:
        if found is None:
            path = local_model_dir(model_id)
            return read(path) if path else None
        if not found.gguf_file:
            return read(package_dir(found.package) / found.subdir)
        # the directory neat_core.models.loading converts the GGUF file into (its DEFAULT_CACHE_DIR layout)
        cache = Path(cache_dir or Path.home() / ".cache" / "neat_core") / "models" / found.id.replace("/", "--")
        if (cache / "config.json").is_file():
            return read(cache)
        return _gguf_shape(package_dir(found.package) / found.gguf_file)
    except (OSError, ValueError, KeyError, ImportError, TypeError):
        return None


def estimate_training_memory(
    shape: ModelShape,
    *,
    batch_size: int,
    seq_len: int,
    causal_lm: bool,
    gradient_checkpointing: bool | str = AUTO,
    adapter_rank: int = 8,
    adapter_targets: int = 2,
    dtype_bytes: int = FP32,
    activation_bytes: int = FP32,
) -> MemoryEstimate:
    """Peak bytes of one training step, as the sum of:

    - base weights: parameters x `dtype_bytes` (4 on a CPU; 2 on a GPU with bf16, where "auto" loads the base
      in bf16: neat_core.devices.base_weights_dtype);
    - adapter: `adapter_targets` adapted modules per layer (q and v: the methods' "auto"), each r x (h + h)
      parameters (an r-wide factor pair, the size of a LoRA/NEAT adapter on a square projection), x 16 bytes:
      fp32 weight, gradient and AdamW's two moments;
    - activations, for B x T tokens (`batch_size` x `seq_len`: the rows of a batch padded to a common length), in
      `activation_bytes` each (fp32; 2 under a GPU's bf16 autocast):
        without checkpointing: L x B x T x (ACT_H h + ACT_I i), everything every layer keeps for the backward;
        with checkpointing: L x B x T x h (each layer's input) + B x T x (ACT_H h + ACT_I i) (the one layer
        being recomputed), the rest recomputed in the backward;
      plus, for a causal LM, LOGIT_COPIES x B x T x V fp32 (logits, the loss's log-softmax, the gradients of
      both), which checkpointing does not reduce.

    Assumptions: attention does not keep a B x heads x T x T score matrix (SDPA's fused kernels, the transformers
    default; an eager-attention model needs more); a DPO job's batch counts as 2B sequences (the caller doubles
    it); the allocator's fragmentation and the framework's own working memory are not counted (on a CPU about
    0.5 GB more at SmolLM2's scale: bench/activation_checkpointing.py prints the estimate beside the measured
    peak): the estimate is a floor, so a job it refuses would not fit."""
    checkpointing = resolve_gradient_checkpointing(gradient_checkpointing, shape.parameters)
    tokens = batch_size * seq_len
    per_layer_token = ACT_H * shape.hidden + ACT_I * shape.intermediate
    if checkpointing:
        kept = shape.layers * tokens * shape.hidden + tokens * per_layer_token
    else:
        kept = shape.layers * tokens * per_layer_token
    activations = kept * activation_bytes + (LOGIT_COPIES * tokens * shape.vocab * FP32 if causal_lm else 0)
    adapter_parameters = adapter_targets * shape.layers * adapter_rank * 2 * shape.hidden
    return MemoryEstimate(
        weights=shape.parameters * dtype_bytes,
        adapter=adapter_parameters * ADAM_BYTES_PER_TRAINABLE,
        activations=activations,
        gradient_checkpointing=checkpointing,
        parameters=shape.parameters,
        batch_size=batch_size,
        seq_len=seq_len,
    )


BYTES_PER_TOKEN = 4  # of a JSONL training line: English BPE runs ~4 characters a token


def estimate_job_memory(
    model_id: str,
    *,
    task: str,
    n_examples: int,
    mean_example_bytes: float,
    batch_size: int | str = AUTO,
    preference_pairs: bool = False,
    adapter: dict[str, Any] | None = None,
    gradient_checkpointing: bool | str = AUTO,
    dtype_bytes: int = FP32,
    activation_bytes: int = FP32,
    cache_dir: Path | None = None,
) -> MemoryEstimate | None:
    """A job's training memory from what its row knows (no model, no data read): `estimate_training_memory` at
    the batch size "auto" or the job resolves to, and a typical step's sequence length: the training file's mean
    line in tokens (`mean_example_bytes` / BYTES_PER_TOKEN), at most the task's "auto" max_seq_len. A batch of
    the file's longest lines needs more; a job refused on its typical step could never train. A DPO job
    (`preference_pairs`) runs each pair as two sequences, 2B rows. `adapter`: the job's adapter hyperparameters
    (r, target_modules; "auto" or absent: r 8 on two projections). None when the model's shape cannot be read."""
    shape = model_shape(model_id, cache_dir)
    if shape is None or n_examples < 1:
        return None
    adapter = adapter or {}
    rank = adapter.get("r") if isinstance(adapter.get("r"), int) else 8
    targets = adapter.get("target_modules")
    batch = auto_batch_size(task, n_examples) if batch_size == AUTO else int(batch_size)
    seq_len = max(1, min(auto_max_seq_len(task), math.ceil(mean_example_bytes / BYTES_PER_TOKEN)))
    return estimate_training_memory(
        shape,
        batch_size=batch * (2 if preference_pairs else 1),
        seq_len=seq_len,
        causal_lm=task != "classification",
        gradient_checkpointing=gradient_checkpointing,
        adapter_rank=rank,
        adapter_targets=len(targets) if isinstance(targets, list) and targets else 2,
        dtype_bytes=dtype_bytes,
        activation_bytes=activation_bytes,
    )


def available_memory(device: str = "auto") -> tuple[str, int, bool]:
    """(what was measured, bytes free to a new job, whether it is a GPU) on this worker's training device: the
    GPU's free memory (torch.cuda.mem_get_info, only when torch is installed and sees a GPU and `device` allows
    one), else the machine's available RAM (psutil; without it, os.sysconf's free pages)."""
    if device != "cpu":
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            import torch  # the job imports it next anyway (a CPU worker on "auto" just does so a moment sooner)

            if torch.cuda.is_available():
                index = (torch.device(device).index or 0) if device.startswith("cuda") else 0
                free, _ = torch.cuda.mem_get_info(index)
                return f"cuda:{index} free memory", int(free), True
    try:
        import psutil

        return "available RAM", int(psutil.virtual_memory().available), False
    except ImportError:
        return "free RAM", os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), False


def gib(n: int) -> str:
    """Bytes for a message: GiB, or MiB below one GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


__all__ = [
    "CHECKPOINTING_MIN_PARAMETERS",
    "auto_batch_size",
    "auto_max_seq_len",
    "estimate_job_memory",
    "MemoryEstimate",
    "ModelShape",
    "available_memory",
    "estimate_training_memory",
    "gib",
    "model_shape",
    "parameters_from_config",
    "resolve_gradient_checkpointing",
    "shape_from_config",
]
