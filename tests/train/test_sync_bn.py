"""GlobalBatchNorm2d on 2 ranks (gloo, CPU) == nn.BatchNorm2d on the whole batch in one process: output,
input and affine gradients, running statistics; with channel means 1000x their std (fp32), where sums of
x and x^2 alone would lose the variance. Tolerances: the float64 batch-norm is the oracle; ours must be
within 2x the error of torch's own fp32 BatchNorm2d plus 1e-5 (outputs; measured equal to it)."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from torch import nn

from repae.train.sync_bn import GlobalBatchNorm2d, sync_batchnorm_

STD = torch.tensor([1.0, 0.5, 2.0, 0.1])


def _inputs():
    g = torch.Generator().manual_seed(5)
    x = 1000 + torch.randn(6, 4, 5, 3, generator=g) * STD.view(1, 4, 1, 1)
    dy = torch.randn(x.shape, generator=g)
    return x, dy


def _bn(dtype=torch.float32):
    bn = nn.BatchNorm2d(4).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 3.0]))
    return bn


def _run(bn, x, dy):
    x = x.clone().requires_grad_(True)
    y = bn(x)
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}


def _worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, dy = _inputs()
    sl = slice(rank * 3, rank * 3 + 3)
    bn = sync_batchnorm_(nn.Sequential(_bn()))[0]
    assert type(bn) is GlobalBatchNorm2d
    res = _run(bn, x[sl], dy[sl])
    for k in ("dw", "db"):  # DDP would average parameter grads; sum them for the whole-batch comparison
        torch.distributed.all_reduce(res[k])
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_global_batchnorm_two_ranks_equal_whole_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    got = {k: torch.cat([r[k] for r in ranks]) if k in ("y", "dx") else ranks[0][k] for k in ranks[0]}
    x, dy = _inputs()
    plain = _run(_bn(), x, dy)
    oracle = _run(_bn(torch.float64), x.double(), dy.double())
    for k in got:
        err = (got[k].double() - oracle[k]).abs().max().item()
        plain_err = (plain[k].double() - oracle[k]).abs().max().item()
        scale = oracle[k].abs().max().item()
        assert err <= 2 * plain_err + 1e-5 * max(scale, 1.0), (k, err, plain_err)
    torch.testing.assert_close(ranks[1]["running_var"], ranks[0]["running_var"], rtol=0, atol=0)
