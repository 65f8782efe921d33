"""Compress a standard-MoE checkpoint into a SaMoE one: L*N experts -> a pool of P + combinations.

``tools/convert_checkpoint.py compress --load MOE_CKPT --pool-size P --save SAMOE_CKPT``:

1. every expert of every MoE layer is one vector ``x = [W1 (h x f), W2 (f x h), W3 (h x f)]`` in the
   pool's layout (DESIGN.md §2), M = L*N vectors;
2. the pool is P centroids of a k-means over them (k-means++ start from ``seed``, Lloyd's
   iterations until no assignment changes); with P = M the pool is the experts themselves;
3. each layer expert's row of A_l is fitted on the simplex, ``min ||x - a @ pool||`` subject to
   ``a >= 0, sum a = 1`` (accelerated projected gradient on the P x P Gram matrix, fp64), and kept
   one-hot on its centroid wherever that is at least as good;
4. the combination logits store the rows: ``C = tau * ln(max(a, min_weight))`` for softmax
   combinations (a zero weight without a floor becomes a logit ``ZERO_GAP`` nats below the row's
   largest, which fp32's and bf16's softmax turn into exactly 0), or ``C = a`` for linear ones.

The routers, attention, norms and embeddings are copied unchanged, so with P = L*N the rows are
one-hot and the SaMoE model's experts are the original experts bit for bit. The relative
reconstruction error of each layer, ``||W_l - A_l @ pool|| / ||W_l||`` over all its experts' weights
(A_l from the stored logits, as the model computes it), is reported and recorded in the new
checkpoint's config.json (``converted_from.compress``). The output is a weights-only checkpoint that
``--load`` continues training from at any EP size: from the source's iteration, data stream and LR
schedule (with a fresh optimizer), as a resharded checkpoint does.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from samoe_dist.export.names import ConversionError
from samoe_dist.export.plain_gpt import PlainGPTConfig, combination_weights

logger = logging.getLogger("samoe")

ZERO_GAP = 120.0  # nats: exp(-120) is 0 in fp32 and bf16, so a zero weight stays exactly zero


def expert_vectors(plain: dict, cfg: PlainGPTConfig) -> torch.Tensor:
    """[L*N, D] every expert of every MoE layer, flattened in the pool's layout (layer-major)."""
    f = cfg.moe_ffn_hidden_size
    rows = []
    for i in cfg.moe_layers:
        for e in range(cfg.num_experts):
            p = f"layers.{i}.mlp.experts.{e}."
            fc1, fc2 = plain[f"{p}fc1.weight"], plain[f"{p}fc2.weight"]
            parts = [fc1[:f].t(), fc2.t()] + ([fc1[f:].t()] if cfg.gated else [])  # w1 [h,f], w2 [f,h], w3 [h,f]
            rows.append(torch.cat([t.reshape(-1) for t in parts]))
    return torch.stack(rows)


def pool_tensors(pool_PD: torch.Tensor, cfg: PlainGPTConfig) -> dict:
    """The pool's w1/w2(/w3) from its flattened rows."""
    h, f = cfg.hidden_size, cfg.moe_ffn_hidden_size
    P = pool_PD.shape[0]
    names = ["w1", "w2"] + (["w3"] if cfg.gated else [])
    shapes = {"w1": (h, f), "w2": (f, h), "w3": (h, f)}
    out, start = {}, 0
    for n in names:
        size = h * f
        out[f"pool.{n}"] = pool_PD[:, start:start + size].reshape(P, *shapes[n]).contiguous()
        start += size
    return out


def kmeans(X: torch.Tensor, k: int, seed: int = 0, max_iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, D], assignment [M]) of Lloyd's k-means from a k-means++ start."""
    M = X.shape[0]
    if k == M:
        return X.clone(), torch.arange(M)
    gen = torch.Generator().manual_seed(seed)
    Xd = X.double()
    chosen = [int(torch.randint(M, (1,), generator=gen))]
    d2 = ((Xd - Xd[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        weights = d2.clone()
        weights[chosen] = 0
        if float(weights.sum()) <= 0:  # the rest duplicate chosen points: any unchosen one
            weights = torch.ones(M, dtype=torch.float64)
            weights[chosen] = 0
        nxt = int(torch.multinomial(weights, 1, generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((Xd - Xd[nxt]) ** 2).sum(1))
    C = Xd[chosen].clone()
    assign = torch.full((M,), -1, dtype=torch.long)
    for _ in range(max_iters):
        new = torch.cdist(Xd, C).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = assign == c
            if members.any():
                C[c] = Xd[members].mean(0)
            else:  # an empty cluster takes the point farthest from its centroid
                far = int(((Xd - C[assign]) ** 2).sum(1).argmax())
                C[c], assign[far] = Xd[far], c
    return C.to(X.dtype), assign


def project_simplex(V: torch.Tensor) -> torch.Tensor:
    """Each row of V projected onto {a >= 0, sum a = 1} (Euclidean; sort-based)."""
    P = V.shape[-1]
    U, _ = V.sort(dim=-1, descending=True)
    css = U.cumsum(-1) - 1
    ind = torch.arange(1, P + 1, dtype=V.dtype)
    rho = ((U - css / ind) > 0).sum(-1, keepdim=True)  # the count of positive entries, >= 1
    theta = css.gather(-1, rho - 1) / rho.to(V.dtype)
    return (V - theta).clamp(min=0)


def fit_simplex(X: torch.Tensor, pool: torch.Tensor, start: torch.Tensor, iters: int = 500) -> torch.Tensor:
    """Rows a on the simplex minimising ||x - a @ pool||^2 (FISTA from ``start``), each kept at
    ``start`` where that is at least as good; [M, P] in fp64."""
    Xd, Cd = X.double(), pool.double()
    G = Cd @ Cd.T  # [P, P]
    B = Xd @ Cd.T  # [M, P]
    const = (Xd * Xd).sum(1)
    step = 1.0 / (2.0 * float(torch.linalg.eigvalsh(G).max().clamp(min=1e-30)))

    def objective(A):  # ||x - a C||^2 per row
        return const - 2 * (A * B).sum(1) + ((A @ G) * A).sum(1)

    A = start.double().clone()
    Y, t = A.clone(), 1.0
    for _ in range(iters):
        A_next = project_simplex(Y - step * 2.0 * (Y @ G - B))
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        Y = A_next + ((t - 1) / t_next) * (A_next - A)
        A, t = A_next, t_next
    keep = objective(start.double()) <= objective(A)
    return torch.where(keep[:, None], start.double(), A)


def combination_logits(A: torch.Tensor, mode: str, temperature: float, min_weight: float) -> torch.Tensor:
    """Logits C whose combination weights are (close to) the rows of A (see the module docstring)."""
    if mode == "linear":
        return A.float()
    if min_weight > 0:
        return (temperature * A.clamp(min=min_weight).log()).float()
    top = A.max(-1, keepdim=True).values.log()
    return (temperature * torch.where(A > 0, A.log(), top - ZERO_GAP)).float()


def compress_state(plain: dict, cfg: PlainGPTConfig, pool_size: int, mode: str = "softmax",
                   temperature: float = 1.0, min_weight: float = 0.0, seed: int = 0, kmeans_iters: int = 100,
                   fit_iters: int = 500) -> tuple[dict, PlainGPTConfig, list[float]]:
    """(SaMoE plain state, its config, relative error per MoE layer) of a standard-MoE plain model."""
    L, N = len(cfg.moe_layers), cfg.num_experts
    X = expert_vectors(plain, cfg)
    pool, assign = kmeans(X, pool_size, seed, kmeans_iters)
    A = fit_simplex(X, pool, torch.nn.functional.one_hot(assign, pool_size), fit_iters)  # [L*N, P]
    logits = combination_logits(A, mode, temperature, min_weight).view(L, N, pool_size)
    new_cfg = PlainGPTConfig(**{**{k: v for k, v in cfg.to_dict().items() if k not in ("format", "version", "kind")},
                                "samoe_pool_size": pool_size, "samoe_temperature": temperature, "samoe_top_m": 0,
                                "samoe_combination": mode, "samoe_route_to_pool": False})
    state = {k: v for k, v in plain.items() if ".mlp.experts." not in k}
    state.update(pool_tensors(pool, cfg))
    errors = []
    for j, i in enumerate(cfg.moe_layers):
        state[f"layers.{i}.mlp.combination_logits"] = logits[j].contiguous()
        A_used = combination_weights(logits[j], temperature, 0, mode).to(pool.dtype)  # as the model computes it
        W, W_hat = X[j * N:(j + 1) * N], A_used @ pool
        errors.append(float((W - W_hat).double().norm() / W.double().norm().clamp(min=1e-30)))
    return state, new_cfg, errors


def compress(load: str, pool_size: int, save: str, overwrite: bool = False, mode: str = "softmax",
             temperature: float = 1.0, min_weight: float = 0.0, seed: int = 0) -> tuple[Path, list[float]]:
    """The newest checkpoint of the standard MoE ``load`` as a weights-only SaMoE checkpoint in ``save``;
    returns (its tag directory, relative reconstruction error per MoE layer)."""
    from safetensors.torch import load_file

    from samoe_dist.export.convert import WEIGHTS, find_tag_dir, inspect_checkpoint, read_json, write_weights_only
    from samoe_dist.export.names import to_plain

    tag_dir = find_tag_dir(load)
    run, cfg = inspect_checkpoint(tag_dir)
    if cfg.kind != "moe":
        raise ConversionError(f"--load {load} is a {cfg.kind} model: compress takes a standard MoE (--num-experts "
                              f"without --samoe-pool-size)")
    total = len(cfg.moe_layers) * cfg.num_experts
    if not 1 <= pool_size <= total:
        raise ConversionError(f"--pool-size {pool_size}: the checkpoint has {len(cfg.moe_layers)} MoE layers x "
                              f"{cfg.num_experts} experts = {total} experts; give a pool size from 1 to {total}")
    if mode not in ("softmax", "linear"):
        raise ConversionError(f"--samoe-combination {mode}: use softmax or linear")
    if temperature <= 0 or not 0 <= min_weight < 1:
        raise ConversionError(f"--samoe-temperature {temperature} must be > 0 and --min-weight {min_weight} in [0, 1)")
    target = Path(save)
    if target.resolve() == tag_dir.resolve() or target.resolve() == Path(load).resolve():
        raise ConversionError(f"--save {save} is the --load checkpoint: choose another directory")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ConversionError(f"--save {save} already exists and is not empty: pass --overwrite to replace it, or "
                              f"choose a new directory (nothing was written)")
    state, new_cfg, errors = compress_state(to_plain(load_file(str(tag_dir / WEIGHTS)), cfg), cfg, pool_size, mode,
                                            temperature, min_weight, seed)
    base = {k: run[k] for k in ("model", "moe", "samoe", "training", "data") if k in run}
    source = {"checkpoint": str(tag_dir.resolve()),
              "compress": {"pool_size": pool_size, "combination": mode, "temperature": temperature,
                           "min_weight": min_weight, "seed": seed, "relative_error_per_layer": errors}}
    client = tag_dir / "client_state.json"
    if client.is_file():  # a training checkpoint: the new one continues its data stream and LR schedule
        source.update(read_json(client, ""))
    extra = {"data_fingerprint": run["data_fingerprint"]} if "data_fingerprint" in run else None
    tag = write_weights_only(state, new_cfg, str(target), base, source, extra=extra, overwrite=True)
    for i, err in zip(cfg.moe_layers, errors):
        logger.info("layer %d: relative reconstruction error %.6f", i, err)
    return target / tag.name, errors
