"""HEAT's heads: score every attention head by a first-order Taylor estimate of the loss change if it were
switched off, keep the most responsive heads, and train LoRA on the kept heads only. A reconstruction: the paper
describes three scoring strategies but publishes no code; what is ours is marked below and in docs/methods.md ("HEAT").

Heads are slices of the attention projections (sizes from the model config):

    q (and o's input)  (B, T, H·d)    query head h   = rows   [h·d, (h+1)·d)  of q,  columns of o
    k, v               (B, T, K·d)    kv head j      = rows   [j·d, (j+1)·d)  of k/v; it serves query heads
                                                       j·G … (j+1)·G - 1      (G = H / K, grouped-query attention)

Selection is over query heads. A k/v head is kept if any query head it serves is kept (ours: the alternative,
"only if all are kept", would leave kept query heads reading an unadapted k/v).

Training is peft's LoRA on the targeted projections with the unselected heads masked: the rows of `lora_B`
(q/k/v: `B` is (d_out, r), a head owns d rows) or the columns of `lora_A` (o: `A` is (r, d_in), a head owns d input
columns) are zeroed and a gradient hook multiplies their gradient by 0, so AdamW (decoupled weight decay included)
never moves them off zero. The artifact is therefore a plain peft LoRA: it loads in stock peft, merges and exports
exactly like LoRA, and the serving engine batches it as LoRA. The selection is the method's state (checkpoints,
manifest) and `restore` re-applies it on resume.

Scores (`score`), each accumulated as a sum over `score_batches` training batches of a per-batch absolute value,
in eval mode (no dropout):
- "gate" (default): a gate g_h = 1 multiplies head h's output before the output projection;
  score_h = Σ_batches |∂L/∂g_h|. Since L(g_h = 0) ≈ L - ∂L/∂g_h, this is the Taylor estimate of removing the head.
- "weight": score_h = Σ_batches |Σ θ·∂L/∂θ| over head h's rows of the frozen q, k, v weights (a kv head's k/v term
  is shared equally by the G query heads it serves, ours).
- "adapter": LoRA on all heads is trained for `score_batches` AdamW steps at `warmup_learning_rate`;
  score_h = Σ_steps |Σ θ·∂L/∂θ| over head h's LoRA entries (B rows of q/k/v, A columns of o; a kv head's term
  shared as above), taken before each step. B starts at zero, so the first step adds nothing. The adapter is then
  reset to its initial values: the warm-up only scores (ours).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from neat_core.errors import InvalidHyperparameterError

HOOKS = "_heat_hooks"  # attribute on the PeftModel: the gradient-mask hook handles, removed on re-application
HELD = "_heat_held"  # attribute on the PeftModel: how many adapter entries the masks hold at zero


@dataclass(frozen=True)
class HeadShape:
    """Attention heads per layer, from the model config (the same in every layer for the families we know)."""

    heads: int  # H, query heads
    kv_heads: int  # K, key/value heads (< H under grouped-query attention)
    head_dim: int  # d

    @property
    def group(self) -> int:  # G: query heads per kv head
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class AttentionBlock:
    """One layer's attention projections, by full module name. A fused layer (GPT-2's `c_attn`) is q = k = v."""

    layer: int
    q: str
    k: str
    v: str
    o: str

    @property
    def fused(self) -> bool:
        return self.q == self.k


def head_shape(model: nn.Module) -> HeadShape:
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise InvalidHyperparameterError("model", f"{heads} query heads do not split into {kv_heads} kv groups")
    return HeadShape(heads, kv_heads, head_dim)


# An attention module's projections by child name, per family: (q, k, v, o), or (qkv, o) where one fused layer's
# output rows are [q (H·d) | k (K·d) | v (K·d)]. GPT-NeoX's fused layer interleaves q, k, v per head instead, which
# these slices do not describe: HEAT refuses it (heat/spec.py).
SEPARATE = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama / SmolLM2 / Qwen2 / Qwen3 / Mistral / Gemma 2, 3
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # OPT
    ("q_lin", "k_lin", "v_lin", "out_lin"),  # DistilBERT
)
FUSED = (("c_attn", "c_proj"), ("qkv_proj", "o_proj"), ("Wqkv", "Wo"))  # GPT-2 / Phi-3 / ModernBERT
# BERT-style: q, k, v in an inner `self` (`attention` in ViT), the output projection in `output.dense`.
INNER = (("query", "key", "value"), ("query_proj", "key_proj", "value_proj"))  # BERT, RoBERTa / DeBERTa-v2


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """Every attention block in model order, for the families above (docs/methods.md, "Architectures")."""
    blocks = []
    for name, module in model.named_modules():
        children = module._modules.keys()
        separate = next((c for c in SEPARATE if set(c) <= children), None)
        fused = next((c for c in FUSED if set(c) <= children), None)
        if separate is not None:
            q, k, v, o = (f"{name}.{c}" for c in separate)
        elif fused is not None:
            q = k = v = f"{name}.{fused[0]}"
            o = f"{name}.{fused[1]}"
        elif (inner := _self_attention(module._modules)) is not None:
            path, qkv = inner
            q, k, v = (f"{name}.{path}.{c}" for c in qkv)
            o = f"{name}.output.dense"
        else:
            continue
        blocks.append(AttentionBlock(len(blocks), q, k, v, o))
    return blocks


def _self_attention(children: dict[str, nn.Module]) -> tuple[str, tuple[str, ...]] | None:
    if "output" not in children or "dense" not in children["output"]._modules:
        return None
    for path in ("self", "attention"):
        for qkv in INNER:
            if path in children and set(qkv) <= children[path]._modules.keys():
                return path, qkv
    return None


def roles(blocks: list[AttentionBlock]) -> dict[str, tuple[int, str]]:
    """module name -> (layer, "q" | "k" | "v" | "o" | "qkv")."""
    out = {}
    for b in blocks:
        out.update({b.q: (b.layer, "qkv")} if b.fused else {b.q: (b.layer, "q"), b.k: (b.layer, "k")})
        out.setdefault(b.v, (b.layer, "v"))
        out[b.o] = (b.layer, "o")
    return out


def _linear_view(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return weight.t() if isinstance(module, Conv1D) else weight  # (d_out, d_in)


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def per_head(values: torch.Tensor, role: str, shape: HeadShape) -> torch.Tensor:
    """Sum a per-row (q/k/v output) or per-column (o input) vector into query heads. values: (n·d,) -> (H,).
    A kv head's sum is shared equally by the G query heads it serves."""
    if role == "qkv":  # a fused layer: [q (H·d) | k (K·d) | v (K·d)] rows
        sizes = [shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.kv_heads * shape.head_dim]
        return sum(per_head(part, r, shape) for part, r in zip(values.split(sizes), "qkv", strict=True))
    if role in ("k", "v"):
        kv = values.view(shape.kv_heads, shape.head_dim).sum(1)  # (K,)
        return kv.repeat_interleave(shape.group) / shape.group  # (H,)
    return values.view(shape.heads, shape.head_dim).sum(1)  # (H,)


def head_mask(kept: torch.Tensor, role: str, shape: HeadShape) -> torch.Tensor:
    """Rows (q/k/v) or input columns (o) of a projection that belong to kept heads. kept: (H,) bool -> (n·d,)."""
    if role == "qkv":
        return torch.cat([head_mask(kept, r, shape) for r in "qkv"])
    if role in ("k", "v"):  # a kv head is kept if any query head it serves is kept
        kept = kept.view(shape.kv_heads, shape.group).any(1)  # (K,)
    return kept.repeat_interleave(shape.head_dim)


# ---- scores: each returns (L, H) float64, summed over batches of a per-batch absolute value ----


@contextmanager
def head_gates(model: nn.Module, blocks: list[AttentionBlock], shape: HeadShape) -> Iterator[torch.Tensor]:
    """Gates g (L, H), all 1, multiplying each head's output before the output projection (a forward pre-hook on
    o_proj / attention.output.dense / attn.c_proj, whose input is the heads' outputs side by side, (B, T, H·d))."""
    device = next(model.parameters()).device
    gates = torch.ones(len(blocks), shape.heads, device=device, requires_grad=True)

    def gate(layer: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]  # (B, T, H·d)
            return (x * gates[layer].to(x.dtype).repeat_interleave(shape.head_dim), *args[1:])

        return hook

    handles = [model.get_submodule(b.o).register_forward_pre_hook(gate(b.layer)) for b in blocks]
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


def gate_scores(model: nn.Module, batches, blocks, shape) -> torch.Tensor:
    scores = torch.zeros(len(blocks), shape.heads, dtype=torch.float64)
    with head_gates(model, blocks, shape) as gates:
        for batch in batches:
            (grad,) = torch.autograd.grad(model(**batch).loss, gates)  # (L, H)
            scores += grad.abs().double().cpu()
    return scores


def _taylor(named: list[tuple[str, torch.Tensor, str, str]], grads, blocks, shape) -> torch.Tensor:
    """|Σ θ·∂L/∂θ| per head for one batch. named: (module name, θ in the linear view, role, "rows" | "cols")."""
    raw = torch.zeros(len(blocks), shape.heads, dtype=torch.float64)
    layer_of = roles(blocks)
    for (module, theta, role, axis), grad in zip(named, grads, strict=True):
        product = (theta.detach() * grad).double()  # (d_out, d_in)
        raw[layer_of[module][0]] += per_head(product.sum(1 if axis == "rows" else 0).cpu(), role, shape)
    return raw.abs()


def weight_scores(model: nn.Module, batches, blocks, shape) -> torch.Tensor:
    """Over the frozen q/k/v weights; they get requires_grad only for the duration."""
    named, weights = [], []
    for b in blocks:
        for name, role in [(b.q, "qkv")] if b.fused else [(b.q, "q"), (b.k, "k"), (b.v, "v")]:
            base = _base(model.get_submodule(name))
            named.append((name, base, role))
            weights.append(base.weight)
    flags = [w.requires_grad for w in weights]
    scores = torch.zeros(len(blocks), shape.heads, dtype=torch.float64)
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(model(**batch).loss, weights)
            views = [(n, _linear_view(w, m), r, "rows") for (n, m, r), w in zip(named, weights, strict=True)]
            scores += _taylor(views, [_linear_view(g, m) for (_, m, _), g in zip(named, grads, strict=True)],
                              blocks, shape)  # fmt: skip
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    return scores


def adapter_scores(model: PeftModel, batches, blocks, shape, learning_rate: float) -> torch.Tensor:
    layers = heat_layers(model, blocks)
    adapter = model.active_adapter
    params, named = [], []
    for name, (layer, role) in layers.items():
        if role == "o":  # a head is a set of A's input columns
            p = layer.lora_A[adapter].weight  # (r, d_in)
            named.append((name, p, role, "cols"))
        else:  # a head is a set of B's rows
            p = layer.lora_B[adapter].weight  # (d_out, r)
            named.append((name, p, role, "rows"))
        params.append(p)
    trained = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    initial = [p.detach().clone() for p in trained]
    optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
    scores = torch.zeros(len(blocks), shape.heads, dtype=torch.float64)
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, trained)
        by_param = {id(p): g for p, g in zip(trained, grads, strict=True)}
        scores += _taylor(named, [by_param[id(p)] for p in params], blocks, shape)  # θ before the step
        for p, g in zip(trained, grads, strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # the warm-up only scored: training starts from the adapter's initial values
        for p, value in zip(trained, initial, strict=True):
            p.copy_(value)
    return scores


# ---- selection and masks ----


def select_heads(scores: torch.Tensor, selection: str, top_k: int | None, keep_fraction: float | None) -> list:
    """Kept query heads per layer (sorted indices), the highest scores first; ties go to the lower index.
    global: top_k of all L·H heads (or ceil(keep_fraction·L·H)); per_layer: top_k of each layer's H (or
    ceil(keep_fraction·H)), which suits models whose layers differ."""
    n_layers, heads = scores.shape
    pools = [list(range(n_layers * heads))] if selection == "global" else [
        list(range(layer * heads, (layer + 1) * heads)) for layer in range(n_layers)
    ]  # fmt: skip
    flat = scores.flatten().tolist()
    kept: list[list[int]] = [[] for _ in range(n_layers)]
    for pool in pools:
        k = top_k if top_k is not None else math.ceil(keep_fraction * len(pool) - 1e-9)
        for i in sorted(pool, key=lambda i: (-flat[i], i))[:k]:
            kept[i // heads].append(i % heads)
    return [sorted(layer) for layer in kept]


def heat_layers(model: PeftModel, blocks: list[AttentionBlock]) -> dict[str, tuple[LoraLayer, str]]:
    """The LoRA layers carrying the active adapter: name -> (layer, role)."""
    layer_of = roles(blocks)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and model.active_adapter in module.lora_A:
            if name not in layer_of:
                raise InvalidHyperparameterError("target_modules", f"{name} is not an attention projection")
            out[name] = (module, layer_of[name][1])
    return out


def apply_selection(model: PeftModel, kept: list[list[int]]) -> int:
    """Zero the unselected heads' LoRA entries and hook their gradients to zero; a projection with no kept head is
    frozen whole. Idempotent (earlier hooks are removed). Returns the entries held at zero."""
    for handle in getattr(model, HOOKS, []):
        handle.remove()
    blocks, shape = attention_blocks(model), head_shape(model)
    if len(kept) != len(blocks) or any(h < 0 or h >= shape.heads for layer in kept for h in layer):
        raise ValueError(f"a selection of {len(kept)} layers does not fit {len(blocks)} layers of {shape.heads} heads")
    adapter, layer_of, handles, held = model.active_adapter, roles(blocks), [], 0
    for name, (layer, role) in heat_layers(model, blocks).items():
        keep = torch.zeros(shape.heads, dtype=torch.bool)
        keep[kept[layer_of[name][0]]] = True
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, d_in), (d_out, r)
        if not keep.any():  # nothing of this projection is adapted: A alone would be dead weight
            a.requires_grad_(False)
            b.requires_grad_(False)
            continue
        rows_or_columns = head_mask(keep, role, shape)
        param, mask = (a, rows_or_columns[None, :]) if role == "o" else (b, rows_or_columns[:, None])
        mask = mask.to(param.device, param.dtype).expand_as(param)  # (r, d_in) or (d_out, r)
        with torch.no_grad():
            param.mul_(mask)
        handles.append(param.register_hook(lambda grad, mask=mask: grad * mask))
        held += int((mask == 0).sum())
    setattr(model, HOOKS, handles)
    setattr(model, HELD, held)
    return held
