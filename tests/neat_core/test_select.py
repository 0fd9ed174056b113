"""Method "auto" (neat_core.train.select): a dev split carved from the training file, every candidate trained
within the budget and scored on it, the winner trained on everything; reproducible, cancellable, resumable."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from safetensors.torch import load_file

from neat_core.errors import InvalidHyperparameterError
from neat_core.methods import method_names
from neat_core.methods.budget import adapter_parameters, equal_budget_ranks
from neat_core.methods.quality import ranking
from neat_core.models.loading import skeleton
from neat_core.train import Callback, TrainSpec, latest_checkpoint, train
from neat_core.train.select import (
    MAX_DEV_EXAMPLES,
    SELECTION_BUDGET,
    TIE_TOLERANCE,
    candidate_steps,
    choose,
    race_plan,
    selection_cost,
    split_dev,
)
from tests.conftest import classification_rows, text_rows, write_jsonl


class Spy(Callback):
    """Counts the hooks a caller sees; optionally stops at once (during selection) or at `stop_at` of the
    winner's run; `look` runs at the first `should_stop`, while the candidates' scratch folder exists."""

    def __init__(self, stop_now: bool = False, stop_at: int | None = None, look=None):
        self.stop_now, self.stop_at, self.look = stop_now, stop_at, look
        self.selections: list[dict] = []
        self.begins: list[dict] = []
        self.steps = 0

    def on_selection(self, report):
        self.selections.append(report)

    def on_train_begin(self, loop, info):
        self.begins.append(info)

    def on_step_end(self, loop, metrics):
        self.steps += 1

    def should_stop(self, loop):
        if self.look is not None:
            self.look()
            self.look = None
        if self.stop_now:
            return True
        return self.stop_at is not None and bool(self.selections) and loop.step >= self.stop_at


def _spec(tiny_models, tmp_path, kind="bert", **kw) -> TrainSpec:
    rows = classification_rows(40) if kind == "bert" else text_rows(40)
    base = dict(
        base_model=str(tiny_models[kind]),
        training_file=write_jsonl(tmp_path / "train.jsonl", rows),
        output_dir=tmp_path / "run",
        method="auto",
        batch_size=4,
        n_epochs=5,
        seed=0,
        device="cpu",
    )
    return TrainSpec(**{**base, **kw})


def _adapter(result) -> dict:
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def test_every_method_is_raced_in_the_measured_order_and_the_lowest_dev_loss_wins(tiny_models, tmp_path):
    spy = Spy()
    # 80 final steps: 5 * (k + ceil(k / 8) * 2/3) <= 0.3 * 80 gives every candidate 4 steps
    result = train(_spec(tiny_models, tmp_path, n_epochs=8), [spy])
    report = result.selection
    assert report["order"] == ranking("classification", method_names()) and report["basis"] == "dev_loss"
    assert [c["method"] for c in report["candidates"]] == report["order"] and report["not_raced"] == []
    losses = [c["dev_loss"] for c in report["candidates"]]
    assert all(math.isfinite(loss) for loss in losses)
    assert report["chosen"] == choose(report["candidates"])
    assert min(losses) * (1 + TIE_TOLERANCE) >= losses[report["order"].index(report["chosen"])]
    assert result.hyperparameters["method"] == report["chosen"] and result.status == "succeeded"
    assert all(c["steps"] == 4 and c["adapter_parameters"] > 0 for c in report["candidates"])
    assert all(c["trainable_parameters"] > c["adapter_parameters"] for c in report["candidates"])  # + the head
    assert all(0 <= c["dev_accuracy"] <= 1 for c in report["candidates"])
    assert report["dev_examples"] == 8 and report["train_examples"] == 32 and report["final_steps"] == 80
    assert report["used_fraction"] <= SELECTION_BUDGET
    # every candidate, and the winner, at the equal budget (LoRA's default count)
    ranks = report["budget"]["ranks"]
    assert report["budget"]["reference"] == "lora" and set(ranks) == set(report["order"])
    assert result.hyperparameters["adapter"]["r"] == ranks[report["chosen"]]
    # the caller saw the choice once, then the winner's run alone (its 80 steps, not the candidates')
    assert spy.selections == [report] and len(spy.begins) == 1 and spy.steps == 80
    assert spy.begins[0]["hyperparameters"]["method"] == report["chosen"]
    out = tmp_path / "run"
    assert json.loads((out / "selection.json").read_text()) == report
    assert not (out / "selection").exists()  # the candidates' scratch is gone
    assert json.loads((result.adapter_dir / "manifest.json").read_text())["method"] == report["chosen"]


def test_a_run_too_short_to_race_takes_the_first_in_the_order_at_no_cost(tiny_models, tmp_path):
    spy = Spy(look=lambda: spy.__dict__.setdefault("scratch", (tmp_path / "run" / "selection").exists()))
    result = train(_spec(tiny_models, tmp_path, n_epochs=1, adapter={"candidates": ["lora", "neat"]}), [spy])
    report = result.selection  # 10 final steps: 3 steps for each of two candidates would cost 0.73 of them
    assert (report["basis"], report["chosen"], report["candidates"]) == ("order", "lora", [])
    assert report["not_raced"] == ["lora", "neat"] and report["used_fraction"] == 0 and spy.scratch is False
    assert result.hyperparameters["method"] == "lora" and spy.steps == 10 and spy.selections == [report]


def test_the_choice_is_the_first_candidate_within_the_tie_tolerance_of_the_lowest_dev_loss():
    def rows(*losses):
        return [{"method": f"m{i}", "dev_loss": loss} for i, loss in enumerate(losses)]

    assert choose(rows(0.500, 0.497)) == "m0"  # 0.6% apart: a tie, the order decides
    assert choose(rows(0.500, 0.490)) == "m1"  # 2% apart: the data decides
    assert choose(rows(None, 0.7, 0.5)) == "m2" and choose(rows(None, None)) == "m0"  # diverged runs score last


def test_the_budget_holds_and_the_same_seed_gives_the_same_adapter(tiny_models, tmp_path):
    # causal LM; 30 final steps: k + ceil(k / 8) * 2/3 <= 0.3 * 30 / 2 gives each candidate 3 steps
    spec = _spec(tiny_models, tmp_path, kind="gpt2", n_epochs=3, adapter={"candidates": ["lora", "neat"]})
    first = train(spec)
    report = first.selection
    assert [c["method"] for c in report["candidates"]] == ["lora", "neat"]  # the order asked for
    assert report["final_steps"] == 30 and report["steps_per_candidate"] == 3
    assert report["selection_cost_steps"] <= SELECTION_BUDGET * 30
    assert all(0 <= c["dev_accuracy"] <= 1 for c in report["candidates"])  # mean token accuracy
    assert report["selection_steps"] == 2 * report["steps_per_candidate"]

    again = train(replace(spec, output_dir=tmp_path / "again"))
    assert again.selection["chosen"] == report["chosen"]
    assert [c["dev_loss"] for c in again.selection["candidates"]] == [c["dev_loss"] for c in report["candidates"]]
    a, b = _adapter(first), _adapter(again)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_resuming_the_winner_reuses_the_choice_and_ends_where_an_uninterrupted_run_does(tiny_models, tmp_path):
    spec = _spec(tiny_models, tmp_path, n_epochs=3, adapter={"candidates": ["neat", "lora"]})  # 30 steps: a race
    whole = train(spec)
    assert whole.selection["basis"] == "dev_loss"
    stopped = Spy(stop_at=7)
    part = train(replace(spec, output_dir=tmp_path / "first", checkpoint_every=3), [stopped])
    assert part.cancelled and part.steps == 7 and part.selection == stopped.selections[0]
    resumer = Spy()
    checkpoint = latest_checkpoint(tmp_path / "first" / "checkpoints")
    resumed = train(replace(spec, output_dir=tmp_path / "second", resume_from=checkpoint), [resumer])
    # no candidate ran again: the report is the first one, wall-clock seconds and all, and nobody was told twice
    assert resumed.selection == part.selection and resumer.selections == []
    assert json.loads((tmp_path / "second" / "selection.json").read_text()) == part.selection
    assert resumed.selection["chosen"] == whole.selection["chosen"] and resumed.steps == whole.steps
    a, b = _adapter(whole), _adapter(resumed)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_the_dev_split_comes_from_the_training_file_alone(tiny_models, tmp_path):
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"text": f"held out {i}", "label": "positive"} for i in range(6)])
    spec = _spec(tiny_models, tmp_path, validation_file=valid, n_epochs=3, adapter={"candidates": ["lora", "neat"]})
    scratch = spec.output_dir / "selection"
    seen = {}

    def look():  # during the first candidate's run: the split it trains and is scored on
        seen["dev"] = (scratch / "dev.jsonl").read_text().splitlines()
        seen["train"] = (scratch / "train.jsonl").read_text().splitlines()

    result = train(spec, [Spy(look=look)])
    training = spec.training_file.read_text().splitlines()
    assert len(seen["dev"]) == 8 and not set(seen["dev"]) & set(seen["train"])
    assert sorted(seen["dev"] + seen["train"]) == sorted(training)
    assert not set(seen["dev"]) & set(valid.read_text().splitlines())
    assert result.metrics["full_valid_loss"] >= 0  # the winner is validated on the customer's own file


def test_split_rules():
    rows = classification_rows(2000)
    dev, rest = split_dev(rows, "classification", seed=3)
    assert len(dev) == MAX_DEV_EXAMPLES and len(rest) == 2000 - MAX_DEV_EXAMPLES
    assert split_dev(rows, "classification", seed=3) == (dev, rest) and split_dev(rows, "classification", 4) != (
        dev,
        rest,
    )
    dev, rest = split_dev(classification_rows(3), "classification", seed=0)  # 1 negative, 2 positive
    assert len(dev) == 1 and {r["label"] for r in rest} == {"negative", "positive"}  # every label keeps a row
    assert [len(part) for part in split_dev(text_rows(2), "causal_lm", seed=0)] == [1, 1]


def test_budget_formula():
    # 2 candidates, 8 steps an epoch, 2 dev batches: k + ceil(k/8) * 2/3 <= 0.3 * 50 / 2 = 7.5 -> k = 6
    assert candidate_steps(50, 2, 8, 2) == 6
    assert 2 * selection_cost(6, 8, 2) <= 15 < 2 * selection_cost(7, 8, 2)
    assert candidate_steps(1000, 5, 10, 1) == 58  # 5 * (58 + 6/3) = 300 <= 300 < 5 * (59 + 6/3)
    assert candidate_steps(3, 5, 1, 1) == 1  # too short: still one step each
    # the race: the most candidates the budget gives MIN_RACE_STEPS (3) each, at least two; or none
    assert race_plan(80, 5, 8, 2) == (5, 4)
    assert race_plan(30, 5, 8, 2) == (2, 3)  # 3 candidates would get 1 step each
    assert race_plan(40, 5, 32, 8) == (2, 3)  # the benchmark's tweets runs: 40 steps, 128 dev examples
    assert race_plan(10, 5, 8, 2) == (0, 0) and race_plan(16, 5, 13, 4) == (0, 0)  # too short: no race


def test_a_cancel_during_selection_stops_it(tiny_models, tmp_path):
    spy = Spy(stop_now=True)
    result = train(_spec(tiny_models, tmp_path, adapter={"candidates": ["neat", "lora"]}), [spy])
    assert result.cancelled and result.adapter_dir is None and result.last_checkpoint is None
    assert spy.selections == [] and spy.begins == []
    assert not (tmp_path / "run" / "selection").exists() and not (tmp_path / "run" / "selection.json").exists()


@pytest.mark.parametrize(
    ("adapter", "field"),
    [({"candidates": ["neat", "dora"]}, "candidates"), ({"candidates": []}, "candidates"), ({"r": 8}, "r")],
)
def test_bad_options_are_refused_by_name(tiny_models, tmp_path, adapter, field):
    with pytest.raises(InvalidHyperparameterError) as refused:
        train(_spec(tiny_models, tmp_path, adapter=adapter))
    assert refused.value.field == field


def test_every_method_is_sized_to_the_count_nearest_loras_default(tiny_models):
    # the tiny Llama's v_proj is 32 -> 16 (grouped-query attention), so NEAT's default rank gives fewer parameters
    # than LoRA's, as on SmolLM2
    def build():
        return skeleton(str(tiny_models["llama"]), task="causal_lm")

    budget, ranks = equal_budget_ranks(build, method_names())
    assert budget == adapter_parameters(build, "lora") and ranks["lora"] == 8
    assert adapter_parameters(build, "neat") < budget and ranks["neat"] > 8  # the default undersized it
    for name, r in ranks.items():
        gap = abs(adapter_parameters(build, name, r=r) - budget)
        assert all(gap <= abs(adapter_parameters(build, name, r=n) - budget) for n in (r - 1, r + 1) if n >= 1), name
