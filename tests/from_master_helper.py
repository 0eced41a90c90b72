"""Run under torchrun by tests/test_scale.py: each process sees something else; from_master
must give every process what rank 0 saw."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from distributed import from_master  # noqa: E402

dist.init_process_group("gloo")
seen = "rank0-saw-this" if dist.get_rank() == 0 else "rank1-saw-that"
print(from_master(seen), flush=True)
dist.destroy_process_group()
