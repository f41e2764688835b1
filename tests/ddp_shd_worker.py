"""torchrun worker for test_distiller.test_ddp_two_process_gloo: SHD steps under real DDP, one per objective."""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tiny_models import tiny_vit

from shd_plugins import SHDDistiller

BATCH = 4


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch rank ``rank`` trains on (the test concatenates them for the one-process reference)."""
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def step_loss(distiller: SHDDistiller, student: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              objective: str) -> torch.Tensor:
    """One step's loss: the SHD term alone ('shd') or with cross-entropy ('shd+ce')."""
    with distiller.recording():
        distiller.teacher_forward(x)
        logits = student(x)
    loss = distiller.compute_loss().loss
    if objective == 'shd+ce':
        return loss + F.cross_entropy(logits, y)
    return loss + 0.0 * logits.sum()  # DDP needs every output in the graph; the head gets zero gradient


def main(out_dir: str) -> None:
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    x, y = rank_batch(rank)
    results = {}
    for objective in ('shd', 'shd+ce'):
        teacher, student = tiny_vit(num_heads=8), tiny_vit(num_heads=2, seed=1)  # same weights on every rank
        distiller = SHDDistiller(teacher, student, temperature=2.0)  # on the bare student, before wrapping
        ddp_student = torch.nn.parallel.DistributedDataParallel(student)
        for _ in range(2):  # a second step proves DDP's reducer saw every gradient of the first
            ddp_student.zero_grad()
            loss = step_loss(distiller, ddp_student, x, y, objective)
            loss.backward()
            if _ == 0:
                first = {n: p.grad.detach().clone() for n, p in student.named_parameters()}
        results[objective] = {'loss': loss.item(), 'first_step_grads': first}
        distiller.remove()
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
