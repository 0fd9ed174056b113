"""Run in a fresh process that never imports neat_core: load adapters with stock transformers + peft and write
their logits for given input ids, so a test can compare them with what neat_core computed.

usage: python stock_peft_probe.py SPEC.json   (spec: base_dir, task, num_labels, input_ids, out, adapters{name: dir})
An adapter stock peft cannot load is reported as {"error": "<exception type>: <message>"} in out.json.
"""

import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

spec = json.loads(open(sys.argv[1]).read())
ids = torch.tensor(spec["input_ids"])
results, errors = {}, {}
for name, adapter_dir in spec["adapters"].items():
    if spec["task"] == "classification":
        base = AutoModelForSequenceClassification.from_pretrained(spec["base_dir"], num_labels=spec["num_labels"])
    else:
        base = AutoModelForCausalLM.from_pretrained(spec["base_dir"])
    try:
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    except Exception as e:  # noqa: BLE001  (reported to the test, which decides whether it was expected)
        errors[name] = f"{type(e).__name__}: {e}"
        continue
    with torch.no_grad():
        results[name] = model(input_ids=ids).logits.contiguous()
assert not any(m == "neat_core" or m.startswith("neat_core.") for m in sys.modules), "neat_core was imported"
save_file(results, spec["out"] + ".safetensors")
open(spec["out"] + ".json", "w").write(json.dumps(errors))
