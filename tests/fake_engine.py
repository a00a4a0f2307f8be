"""A stand-in for DeepSpeed's engine where only its checkpoint save matters (tests of checkpoint
bookkeeping and of the ranks' agreement on a resume)."""
from pathlib import Path

import torch


class FakeEngine:
    """Writes one file per tag, as DeepSpeed's collective save would (world of one); `crash` stops
    it half-way, as a preemption or a full disk would."""

    def __init__(self, crash: bool = False):
        self.crash = crash

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours, written atomically after every rank finished
        (Path(root) / tag).mkdir(parents=True)
        torch.save(client_state, Path(root) / tag / "mp_rank_00_model_states.pt")
        if self.crash:
            (Path(root) / tag / "zero_pp_rank_7_mp_rank_00_optim_states.pt").write_bytes(b"half")
            raise OSError("killed while saving")

