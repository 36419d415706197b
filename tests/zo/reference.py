"""Straightforward float64 references for the zeroth-order optimizers, written independently of
ftlab.zo: z materialised whole from its documented definition, perturb/evaluate/restore per
seed, then the update (shared by test_mezo.py and test_variants.py)."""

import functools
import random
import struct

import torch

from ftlab.zo.directions import SIGN_SEED, SIGN_TABLE_SIZE, TABLE_SEED, TABLE_SIZE, param_seed, strides

_param_seed = param_seed


@functools.lru_cache(maxsize=2)
def _table(distribution):
    table = torch.randn(TABLE_SIZE, generator=torch.Generator().manual_seed(TABLE_SEED)).double()
    return table.sign() if distribution == "rademacher" else table


def z_of(p, step_seed, index, chunk, distribution="gaussian", generator="torch"):
    """The documented definition of z, written independently: sequential chunks of one
    generator seeded per (step seed, parameter index), or signed slices of the noise table."""
    parts, n = [], p.numel()
    if generator == "strided":
        # z[i] = S[o2 + (i // C) s2] * T[o + (i // C) s + i % C], element by element
        table = _table(distribution)
        signs = torch.randint(0, 2, (SIGN_TABLE_SIZE,), generator=torch.Generator().manual_seed(SIGN_SEED)) * 2 - 1
        o, s, o2, s2 = strides(step_seed, index, n, chunk)
        i = torch.arange(n)
        z = signs[o2 + (i // chunk) * s2].double() * table[o + (i // chunk) * s + i % chunk]
        return z.to(p.dtype).view_as(p)
    if generator == "table":
        table = _table(distribution)
        rng = random.Random(_param_seed(step_seed, index))
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            offset = rng.randrange(TABLE_SIZE - size + 1)
            parts.append(table[offset:offset + size] * (1 if rng.getrandbits(1) else -1))
        return torch.cat(parts).to(p.dtype).view_as(p)
    gen = torch.Generator().manual_seed(_param_seed(step_seed, index))
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        if distribution == "gaussian":
            parts.append(torch.randn(size, generator=gen))
        else:
            parts.append(torch.randint(0, 2, (size,), generator=gen).float() * 2 - 1)
    return torch.cat(parts).to(p.dtype).view_as(p)


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def directions(params, seeds, chunk, distribution="gaussian", generator="torch", masks=None):
    """z of every parameter for every seed (``zs[k][i]``), zeroed outside ``masks[i]`` if given."""
    zs = [[z_of(p, s, i, chunk, distribution, generator) for i, p in enumerate(params)] for s in seeds]
    if masks is not None:
        zs = [[z * m for z, m in zip(z_seed, masks)] for z_seed in zs]
    return zs


@torch.no_grad()
def projected_grads(params, loss_fn, zs, eps, one_sided=False):
    """Perturb, evaluate and restore per seed; the projected gradients rounded to float32, as
    MeZO uses (and logs) them."""
    base = loss_fn() if one_sided else None
    grads = []
    for z in zs:
        for p, zi in zip(params, z):
            p.add_(eps * zi)
        plus = loss_fn()
        if one_sided:
            grads.append((plus - base) / eps)
            for p, zi in zip(params, z):
                p.sub_(eps * zi)
        else:
            for p, zi in zip(params, z):
                p.sub_(2 * eps * zi)
            grads.append((plus - loss_fn()) / (2 * eps))
            for p, zi in zip(params, z):
                p.add_(eps * zi)
    return [f32(g) for g in grads]


def reference_step(params, loss_fn, seeds, lr, eps, wd_of, chunk, one_sided=False, distribution="gaussian",
                   generator="torch"):
    """The straightforward MeZO step: perturb/evaluate/restore per seed, then decay and update.
    As documented, MeZO uses the lr rounded to float32."""
    lr = f32(lr)
    zs = directions(params, seeds, chunk, distribution, generator)
    grads = projected_grads(params, loss_fn, zs, eps, one_sided)
    with torch.no_grad():
        for p in params:
            p.mul_(1 - lr * wd_of(p))
        for g, z in zip(grads, zs):
            for p, zi in zip(params, z):
                p.sub_(lr * g / len(seeds) * zi)
    return grads
