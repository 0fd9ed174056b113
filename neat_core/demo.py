"""Bundled training demo (the README's run command): NEAT on MiniLM, tweet sentiment, then inference.

python -m neat_core.demo [--out runs/demo] [--n-train 400] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from neat_core.artifacts import load_artifact
from neat_core.data.samples import tweets
from neat_core.inference import classify
from neat_core.train import Callback, TrainSpec, train

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


class PrintProgress(Callback):
    def on_train_begin(self, loop, info):
        hp = info["hyperparameters"]
        print(
            f"NEAT on {MINILM}: {hp['total_steps']} steps, batch {hp['batch_size']}, lr {hp['learning_rate']:g}, "
            f"r={hp['adapter']['r']} on {hp['adapter']['target_modules']}, "
            f"{info['adapter_parameters']:,} adapter parameters",
            flush=True,
        )

    def on_step_end(self, loop, metrics):
        if loop.step % 25 == 0:
            print(f"  step {loop.step:4d}  train_loss {metrics['train_loss']:.4f}", flush=True)

    def on_evaluate(self, loop, metrics):
        print(
            f"  step {loop.step:4d}  full_valid_loss {metrics['full_valid_loss']:.4f}  "
            f"full_valid_accuracy {metrics['full_valid_accuracy']:.3f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    train_rows, heldout_rows = tweets(args.n_train, 200)
    data = Path(tempfile.mkdtemp(prefix="neat-demo-"))
    for name, rows in (("train", train_rows), ("heldout", heldout_rows)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = train(
        TrainSpec(
            base_model=MINILM,
            training_file=data / "train.jsonl",
            validation_file=data / "heldout.jsonl",
            output_dir=args.out,  # epochs, batch size, learning rate, r, targets: all "auto"
            device=args.device,
        ),
        callbacks=[PrintProgress()],
    )
    print(f"adapter: {result.adapter_dir} (stock-peft loadable; exact LoRA export in {result.adapter_dir / 'lora'})")
    loaded = load_artifact(result.adapter_dir, device=args.device)
    for text in ("I love how smooth this ride is", "worst traffic jam ever, so angry"):
        prediction = classify(loaded.model, loaded.tokenizer, [text])[0]
        print(f"  {text!r} -> {prediction['label']} ({prediction['probabilities'][prediction['label']]:.2f})")


if __name__ == "__main__":
    main()
