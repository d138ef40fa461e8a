"""Reduce a checkpoint without loading it: decoder layers stream from its safetensors shards one at a time
(data-free STUN here, so no calibration pass). The same call handles checkpoints far bigger than memory.

    python examples/stream_checkpoint.py [CHECKPOINT_DIR] OUT_DIR
"""

import sys

from hf_moeprune import MoEPruneConfig, reduce_checkpoint
from hf_moeprune.testbed import default_model_path

source = sys.argv[1] if len(sys.argv) > 2 else default_model_path()
output = sys.argv[-1] if len(sys.argv) > 1 else "out/testbed-stun-streamed"
folder = reduce_checkpoint(source, output, MoEPruneConfig(method="stun", expert_sparsity=0.25), overwrite=True)
print(f"saved {folder}")
