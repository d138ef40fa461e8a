"""Prune the bundled 8-expert testbed to 4 experts per layer, save it, and load it back with plain transformers.

    python examples/prune_and_reload.py OUT_DIR
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig
from hf_moeprune.testbed import calibration_documents, default_model_path

output = sys.argv[1] if len(sys.argv) > 1 else "out/testbed-frequency-4e"
model = AutoMoEPruneModelForCausalLM.from_pretrained(default_model_path())
texts = [document.text for document in calibration_documents()][:32]
model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=4), calibration=texts, max_sequences=16)
model.save_pretrained(output, overwrite=True)

reloaded = AutoModelForCausalLM.from_pretrained(output)  # no hf_moeprune needed from here on
tokens = AutoTokenizer.from_pretrained(output)("To be, or not to be", return_tensors="pt").input_ids
with torch.no_grad():
    same = torch.equal(model(input_ids=tokens).logits, reloaded(input_ids=tokens).logits)
print(f"saved {output}: {model.summary()[0]['num_experts']} experts per layer; reloaded logits identical: {same}")
