"""Model benchmark: forward+backward throughput and peak memory of (K:P) x B stacks on the CPU.

Every configuration runs in a fresh subprocess (``python -m mtfm_rec.bench.model --worker``) so
its peak memory is its own: ``ru_maxrss`` after the steps, minus ``ru_maxrss`` once the model and
batch are built (the training-step working set: activations, gradients, temporaries), and the
whole process's peak beside it. All configurations share one size with long histories
(N = H + R + T tokens per sample, L_T << N) and one thread count.

Analytic FLOPs come from ``mtfm_rec.model.flops`` on each row's batch, forward x 3 for forward +
backward (per step): "HTA" is the attention stack as implemented (attention over padded
``[max_q, max_tokens]`` blocks, K/V projected on all N tokens in target layers); "model" is the
whole model's *useful* count (only the (query, key) pairs the mask lets through), and MFU is
that per second over the matmul peak of ``mtfm_rec.bench.peak`` (fp32, the rows' thread count).

Target (paper Table 3, from the issue): (3:1) x 4 with GQA at >= 1.8x the throughput of
(0:16) x 1 (no GQA) at <= 0.6x its peak (step) memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List

STACKS = [(0, 16, 1), (16, 0, 1), (1, 1, 8), (3, 1, 4), (5, 1, 3)]  # (K, P, B)
HEADS = 4
KV_HEADS = (HEADS, 1)  # without GQA (G = H), with GQA (G = 1)


def _sizes(quick: bool) -> Dict[str, int]:
    if quick:
        # The full size with fewer samples and steps: tiny sequences would measure per-op overhead.
        return dict(batch=4, history=300, realtime=100, targets=32, d_model=64, steps=2, warmup=1, threads=1)
    return dict(batch=8, history=300, realtime=100, targets=32, d_model=64, steps=5, warmup=1, threads=1)


def _worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from mtfm_rec.model import MTFM, ModelConfig
    from mtfm_rec.model.examples import fixed_size_batch, long_history_schema
    from mtfm_rec.model.flops import model_flops

    sizes = spec["sizes"]
    torch.set_num_threads(sizes["threads"])
    torch.manual_seed(0)
    schema = long_history_schema()
    batch = fixed_size_batch(schema, sizes["batch"], sizes["history"], sizes["realtime"], sizes["targets"])
    config = ModelConfig(
        embedding_dim=16,
        d_model=sizes["d_model"],
        tokenizer_hidden=[sizes["d_model"]],
        num_blocks=spec["blocks"],
        target_layers_per_block=spec["k"],
        full_layers_per_block=spec["p"],
        num_heads=HEADS,
        num_kv_heads=spec["g"],
        attention_backend=spec["backend"],
    )
    model = MTFM(schema, config)
    params = [p for p in model.parameters()]
    for p in params:  # gradients allocated up front: they are not the step's working set
        p.grad = torch.zeros_like(p)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall: List[float] = []
    cpu: List[float] = []
    for step in range(sizes["warmup"] + sizes["steps"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss, _ = model(batch)
        loss.backward()
        if step >= sizes["warmup"]:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flops = model_flops(config, schema, batch)
    # The machine is shared: process CPU time (one thread) is not inflated by other processes
    # waiting for the cores, wall time is; both are kept, the fastest step of each.
    step_s = min(cpu)
    return {
        "step_s": step_s,
        "step_wall_s": min(wall),
        "samples_per_s": batch.batch_size / step_s,
        "tokens_per_s": batch.num_tokens / step_s,
        "peak_rss_mib": peak_kib / 1024,
        "step_mem_mib": (peak_kib - base_kib) / 1024,
        "tokens_per_sample": batch.max_tokens,
        "targets_per_sample": batch.max_targets,
        "hta_gflops_fwd_bwd": 3 * (flops.projections + flops.attention_padded) / 1e9,
        "model_gflops_fwd_bwd": flops.train_step / 1e9,
    }


def run(quick: bool) -> Dict[str, Any]:
    from mtfm_rec.bench.peak import matmul_gflops

    sizes = _sizes(quick)
    peak = matmul_gflops("fp32", sizes["threads"])
    rows: List[Dict[str, Any]] = []
    for k, p, blocks in STACKS:
        for g in KV_HEADS:
            spec = dict(k=k, p=p, blocks=blocks, g=g, backend="prefix", sizes=sizes)
            proc = subprocess.run(
                [sys.executable, "-m", "mtfm_rec.bench.model", "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "OMP_NUM_THREADS": str(sizes["threads"])},
            )
            if proc.returncode:
                raise RuntimeError(f"bench worker {spec} failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result.update(
                name=f"({k}:{p})x{blocks}",
                k=k,
                p=p,
                blocks=blocks,
                heads=HEADS,
                kv_heads=g,
                hta_gflops_per_s=result["hta_gflops_fwd_bwd"] / result["step_s"],
                model_gflops_per_s=result["model_gflops_fwd_bwd"] / result["step_s"],
            )
            result["mfu"] = result["model_gflops_per_s"] / peak
            rows.append(result)
            print(
                f"[bench.model] {result['name']} G={g}: {result['samples_per_s']:.1f} samples/s, "
                f"step mem {result['step_mem_mib']:.0f} MiB, MFU {100 * result['mfu']:.1f} %",
                flush=True,
            )
    base = next(r for r in rows if r["name"] == "(0:16)x1" and r["kv_heads"] == HEADS)
    hta = next(r for r in rows if r["name"] == "(3:1)x4" and r["kv_heads"] == 1)
    speedup = hta["samples_per_s"] / base["samples_per_s"]
    memory = hta["step_mem_mib"] / base["step_mem_mib"]
    for r in rows:
        r["speedup_vs_full"] = r["samples_per_s"] / base["samples_per_s"]
        r["step_mem_vs_full"] = r["step_mem_mib"] / base["step_mem_mib"]
    return {
        "quick": quick,
        "sizes": sizes,
        "attention_backend": "prefix",
        "peak_gflops": peak,
        "rows": rows,
        "target": {
            "speedup": speedup,
            "memory_ratio": memory,
            "peak_rss_ratio": hta["peak_rss_mib"] / base["peak_rss_mib"],
            "met": bool(speedup >= 1.8 and memory <= 0.6),
        },
    }


def render(result: Dict[str, Any]) -> str:
    s = result["sizes"]
    lines = [
        f"Forward + backward of the whole model (tokenizer, HTA, MMoE, loss), fp32, "
        f"{s['threads']} thread(s), attention backend `{result['attention_backend']}`; "
        f"batch of {s['batch']} samples x ({s['history']} H + {s['realtime']} R + {s['targets']} T) tokens, "
        f"d_model {s['d_model']}, H = {HEADS} query heads; fastest of {s['steps']} steps after "
        f"{s['warmup']} warm-up{' (quick mode)' if result['quick'] else ''}. Throughput from process "
        "CPU time (one thread; robust to neighbours on a shared machine), wall time beside it. Step "
        "memory = peak RSS minus RSS once the model, its gradients and the batch exist (fresh "
        "process per row).",
    ]
    mfu = "peak_gflops" in result  # results measured before the MFU columns existed lack them
    if mfu:
        lines += [
            "",
            "HTA GFLOP: the attention stack as computed (padded attention blocks); model GFLOP: the whole "
            "model, useful work only (visible (query, key) pairs), forward + backward = 3 x forward "
            f"(`mtfm_rec.model.flops`); MFU = model GFLOP/s over the fp32 matmul peak on {s['threads']} "
            f"thread(s) measured beside it, {result['peak_gflops']:.0f} GFLOP/s.",
        ]
    extra = " model GFLOP/step | MFU |" if mfu else ""
    lines += [
        "",
        "| stack | G | samples/s | tokens/s | speedup | wall s/step | step mem (MiB) | vs full "
        "| peak RSS (MiB) | HTA GFLOP/step | HTA GFLOP/s |" + extra,
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if mfu else ""),
    ]
    for r in result["rows"]:
        cells = f" {r['model_gflops_fwd_bwd']:.2f} | {100 * r['mfu']:.1f} % |" if mfu else ""
        lines.append(
            f"| {r['name']} | {r['kv_heads']} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} "
            f"| {r['speedup_vs_full']:.2f}x | {r['step_wall_s']:.2f} | {r['step_mem_mib']:.0f} "
            f"| {r['step_mem_vs_full']:.2f}x "
            f"| {r['peak_rss_mib']:.0f} | {r['hta_gflops_fwd_bwd']:.2f} | {r['hta_gflops_per_s']:.1f} |"
            + cells
        )
    t = result["target"]
    lines += [
        "",
        f"Target: (3:1)x4 with GQA (G=1) vs (0:16)x1 without (G={HEADS}): throughput "
        f"{t['speedup']:.2f}x (need >= 1.8x), step memory {t['memory_ratio']:.2f}x (need <= 0.6x; "
        f"whole-process peak RSS {t['peak_rss_ratio']:.2f}x): **{'met' if t['met'] else 'NOT met'}**.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", help="internal: one configuration as JSON")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    print(render(run(args.quick)))


if __name__ == "__main__":
    main()
