"""torchrun worker for test_distiller.test_ddp_two_process_gloo: one SHD + CE step under real DDP."""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tiny_models import tiny_vit

from shd_plugins import SHDDistiller


def main(out_dir: str) -> None:
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    teacher, student = tiny_vit(num_heads=8), tiny_vit(num_heads=2, seed=1)  # same weights on every rank
    distiller = SHDDistiller(teacher, student, temperature=2.0)  # on the bare student, before wrapping
    ddp_student = torch.nn.parallel.DistributedDataParallel(student)
    gen = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    for _ in range(2):  # a second step proves DDP's reducer saw every gradient of the first
        ddp_student.zero_grad()
        with distiller.recording():
            distiller.teacher_forward(x)
            logits = ddp_student(x)
        loss = F.cross_entropy(logits, y) + distiller.compute_loss().loss
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters()}
    torch.save({'loss': loss.item(), 'grads': grads}, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
