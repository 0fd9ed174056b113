"""`python -m inference.gguf`: the files llama.cpp inference servers (the `llamacpp` kind, docs/serving.md) load.

    python -m inference.gguf base HuggingFaceTB/SmolLM2-135M-Instruct --out /shared/gguf/smollm2.f32.gguf
    python -m inference.gguf adapter <artifact dir, or its ?format=lora download> --model ft:...:<job> --out-dir DIR

`base`: the base model's weights, as our servers load them (the catalog's, dequantised to fp32 where the catalog
ships a GGUF), written as an f32 GGUF. `adapter`: an artifact's exact LoRA export (its `lora/`) as a GGUF LoRA named
for the model id (`control.backends.gguf_adapter_file`), which is how the API finds it on a server.

The conversion is llama.cpp's own (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py` from the tree
scripts/llamacpp/build.sh leaves in NEAT_LLAMACPP_DIR): llama.cpp permutes the query and key rows for its rope
layout, and a second, hand-written copy of those rules could silently disagree with the server that reads them.
f32 throughout: the same numbers our engine computes with, so an adapter's greedy tokens match ours.

Each file is written beside its destination and renamed into place: a crash leaves no half-written GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from control.backends import gguf_adapter_file
from control.settings import get_settings
from neat_core.artifacts import read_manifest
from neat_core.errors import ArtifactError
from neat_core.models.loading import resolve


def _converter(llamacpp_dir: Path, script: str) -> Path:
    path = llamacpp_dir / "src" / script
    if not path.exists():
        raise SystemExit(f"{path} is missing: build llama.cpp first (scripts/llamacpp/build.sh, NEAT_LLAMACPP_DIR)")
    return path


def _run(llamacpp_dir: Path, script: str, args: list[str], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    # The tree's own gguf-py, not a PyPI `gguf`: the writer that matches the server built from the same tree.
    env = {**os.environ, "PYTHONPATH": str(llamacpp_dir / "src" / "gguf-py")}
    command = [sys.executable, str(_converter(llamacpp_dir, script)), *args, "--outtype", "f32", "--outfile", str(tmp)]
    try:
        subprocess.run(command, env=env, check=True)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def convert_base(model: str, out: Path, llamacpp_dir: Path, base_dir: Path | None = None) -> Path:
    """`model`'s weights (a catalog id, or a registered model's directory `base_dir`) as an f32 GGUF at `out`."""
    return _run(llamacpp_dir, "convert_hf_to_gguf.py", [str(base_dir or resolve(model))], out)


def convert_adapter(
    artifact: Path, model_id: str, out_dir: Path, llamacpp_dir: Path, base_dir: Path | None = None
) -> Path:
    """The artifact's exact LoRA export as `out_dir/gguf_adapter_file(model_id)`. `artifact`: the artifact's
    directory on shared storage, or its LoRA download (`GET /v1/fine_tuning/jobs/{id}/adapter?format=lora`)."""
    manifest = read_manifest(artifact)
    if manifest.get("task") != "causal_lm":
        raise ArtifactError(f"{artifact} is a {manifest.get('task')} adapter; llama.cpp servers generate text only")
    lora = Path(artifact) / "lora"
    if not (lora / "adapter_config.json").exists() and _is_lora(Path(artifact)):
        lora = Path(artifact)  # the API's LoRA download (`GET .../adapter?format=lora`): the export + manifest.json
    if not (lora / "adapter_config.json").exists():
        raise ArtifactError(
            f"{artifact} has no exact LoRA export (method {manifest.get('method')!r}: its update is not low-rank); "
            "serve it with our inference servers"
        )
    base = base_dir or resolve(manifest["base_model"])
    return _run(llamacpp_dir, "convert_lora_to_gguf.py", ["--base", str(base), str(lora)],
                Path(out_dir) / gguf_adapter_file(model_id))  # fmt: skip


def _is_lora(directory: Path) -> bool:
    try:
        return json.loads((directory / "adapter_config.json").read_text()).get("peft_type") == "LORA"
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m inference.gguf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--llamacpp-dir", type=Path, default=Path(settings.llamacpp_dir))
    parser.add_argument("--base-dir", type=Path, help="a registered base model's directory (not a catalog model)")
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("base", help="a base model as an f32 GGUF")
    base.add_argument("model")
    base.add_argument("--out", type=Path, required=True)
    adapter = commands.add_parser("adapter", help="an artifact's LoRA export as a GGUF LoRA named for its model id")
    adapter.add_argument("artifact", type=Path)
    adapter.add_argument("--model", required=True, help="the fine-tuned model's id, as the API names it")
    adapter.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "base":
        print(convert_base(args.model, args.out, args.llamacpp_dir, args.base_dir))
    else:
        try:
            print(convert_adapter(args.artifact, args.model, args.out_dir, args.llamacpp_dir, args.base_dir))
        except ArtifactError as e:
            raise SystemExit(str(e)) from e


if __name__ == "__main__":
    main()
