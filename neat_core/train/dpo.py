"""Direct preference optimisation (Rafailov et al., 2023) inside the loop: the loss of one batch of preference
pairs, its validation pass, and the held-out preference accuracy of any model.

The reference policy is the frozen base model, which every adapter method wraps: the same module with its adapter
switched off (peft's `disable_adapter()`), run without gradients. No second copy of the model is held. What it
costs is one extra forward pass per step (2B sequences, no activations kept for backward), about a third of a
supervised step on the same 2B sequences (docs/methods.md, "Preference tuning").

The loss is DPO's sigmoid loss with trl's definitions of the logged rewards, margin and accuracy, written here
rather than taken from trl: trl offers it only as a method of `DPOTrainer`, a transformers `Trainer` that owns its
own loop, data collation and reference-model handling. This loop is not a `Trainer`, and the loss is four lines
of tensor arithmetic; importing trl (with accelerate and datasets) into the worker for them would cost more than it
saves.

Shapes: a batch of B pairs is collated as 2B rows (`Collator`): rows 0..B-1 hold the preferred replies, rows
B..2B-1 the non-preferred ones, both [2B, T]. Per-sequence log-probabilities are [2B]; `.chunk(2)` splits them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neat_core.data.encode import IGNORE_INDEX, Collator


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens: logits [N, T, V], labels [N, T] -> [N]. Position t
    predicts token t+1. log p = logit - logsumexp(logits): unlike `log_softmax`, this keeps no [N, T, V] result of
    its own for the backward pass, so a DPO step holds no more logits than a supervised step's cross-entropy."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = logits.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [N, T-1]
    return ((picked - torch.logsumexp(logits, dim=-1)) * mask).sum(-1)


def _logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                          batch["labels"])  # fmt: skip


@torch.no_grad()
def reference_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[2B] log-probabilities under the reference policy: the base model (adapter off), in eval mode (no dropout:
    the reference is the model as it would be served)."""
    was_training = model.training
    model.eval()
    with model.disable_adapter():
        logps = _logps(model, batch)
    model.train(was_training)
    return logps


def pair_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair loss and rewards from [2B] policy and reference log-probabilities. trl's definitions: a reply's
    reward is beta · (log π(y|x) − log π_ref(y|x)); the loss is −log σ(reward_chosen − reward_rejected)."""
    chosen, rejected = (beta * (policy - reference)).chunk(2)  # [B] each
    return {
        "loss": -F.logsigmoid(chosen - rejected),
        "rewards_chosen": chosen.detach(),
        "rewards_rejected": rejected.detach(),
        "reward_margin": (chosen - rejected).detach(),
        "preference_accuracy": (chosen > rejected).float().detach(),
    }


def step_loss(model, batch: dict[str, torch.Tensor], beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """One training batch: (mean loss with gradients to the adapter, the step's mean statistics)."""
    reference = reference_logps(model, batch)  # first: its activations are freed before the policy's are built
    terms = pair_terms(_logps(model, batch), reference, beta)
    loss = terms.pop("loss").mean()
    return loss, {name: float(value.mean()) for name, value in terms.items()}


@torch.no_grad()
def evaluate(model, dataset: list[dict], collate: Collator, batch_size: int, device, autocast, beta: float) -> dict:
    """The validation pass: every statistic averaged over pairs (batch-size independent). `autocast` is a
    context-manager factory (the loop's)."""
    model.eval()
    sums: dict[str, float] = {}
    for start in range(0, len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collate(dataset[start : start + batch_size]).items()}
        with autocast():
            terms = pair_terms(_logps(model, batch), reference_logps(model, batch), beta)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.sum())
    model.train()
    n = max(1, len(dataset))
    return {f"full_valid_{name}": total / n for name, total in sums.items()}


@torch.no_grad()
def preference_accuracy(model, dataset: list[dict], collate: Collator, batch_size: int = 8) -> float:
    """The share of pairs whose preferred reply the model (as it is: adapter on, if it has one) gives a higher
    log-probability than the non-preferred one. Unlike the training metric, which measures the change from the
    reference (and is 0 for the base model by construction), this scores a base model and an adapted one alike."""
    device = next(model.parameters()).device
    model.eval()
    wins = 0
    for start in range(0, len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collate(dataset[start : start + batch_size]).items()}
        chosen, rejected = _logps(model, batch).chunk(2)
        wins += int((chosen > rejected).sum())
    return wins / max(1, len(dataset))
