# torchrun --standalone --nproc-per-node=4 examples/quickstart.py
import torch
import torch.distributed as dist

import ringattn

dist.init_process_group("gloo")  # "nccl" on GPUs
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # same global tensors on every rank, for the check below
q, k, v = torch.randn(1, 8192, 8, 64), torch.randn(1, 8192, 2, 64), torch.randn(1, 8192, 2, 64)
ql, kl, vl = (ringattn.shard(t, "zigzag", rank=rank, world_size=world) for t in (q, k, v))
out = ringattn.ring_attention(ql, kl, vl, causal=True, layout="zigzag")  # (1, 8192/W, 8, 64)
full = ringattn.unshard(out, "zigzag")  # (1, 8192, 8, 64), global order

ref = torch.nn.functional.scaled_dot_product_attention(
    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
).transpose(1, 2)
if rank == 0:
    print(f"W={world} max |ring - sdpa| = {(full - ref).abs().max():.2e}")
dist.destroy_process_group()
