"""muP with FSDP2: meta-device init, set_base_shapes, fully_shard, a mupopt optimizer, a DCP
checkpoint. Run with torchrun (any number of ranks; NCCL on GPUs, gloo on CPUs):

    torchrun --nproc-per-node 2 examples/fsdp_mup.py [checkpoint folder]
"""
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import mupopt


class MLP(nn.Module):
    def __init__(self, width: int, vocab: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                                    for _ in range(2))
        self.out = nn.Linear(width, vocab)

    def forward(self, x):
        h = self.emb(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def main(width: int = 256, steps: int = 3, checkpoint: str = "/tmp/mupopt-fsdp-ckpt"):
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    with torch.device("meta"):                    # no memory until the shards exist
        model = MLP(width)
        base, delta = MLP(64), MLP(128)           # the tuning width, and any other width
    mupopt.set_base_shapes(model, base, delta=delta)   # before or after fully_shard: both work
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)                            # parameters are now DTensors sharded on dim 0
    model.to_empty(device=device)
    torch.manual_seed(0)
    mupopt.init_mup_(model, std_base=0.02)        # muP init of the matrices by role, on each shard
    for p in model.parameters():
        if p.ndim == 1:                           # biases: to_empty left them uninitialised
            nn.init.zeros_(p)
    opt = mupopt.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)   # muP rules of the global shapes

    for step in range(steps):
        x = torch.randint(0, 64, (8, 16), device=device)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    if dist.get_rank() == 0:
        print(f"loss {loss.item():.4f}; backends: {opt.selected_backends}")

    # Checkpoint: every rank writes its shards; the muP records travel in the optimizer state.
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint)     # ... in the resumed job
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    main(checkpoint=sys.argv[1]) if len(sys.argv) > 1 else main()
