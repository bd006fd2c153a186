"""RSSM ensemble rollout latency: the one-launch kernel against four torch paths.

Providers (same inputs, same run):
- ``hybrid_triton``: ``rssm_rollout`` (persistent split path where the SMs allow; the kernel
  variant ``default_variant(H)`` picks, or ``--variant``), with a reused workspace, as
  ``DynamicsModel.predict`` calls it.
- ``hybrid_triton_graph``: the same launch captured once in a CUDA graph (``RolloutGraph``)
  and replayed, as ``torch_cuda_graph`` replays the batched torch form: no per-call Python
  validation and argument binding, which dominate the direct call at small T.
- ``hybrid_triton_single``: the same variant forced to one program per member (the path the
  interpreter runs), to show what the split buys.
- ``torch_eager``: a loop over members, each rolled out by ``rssm_rollout_ref`` with K=1.
- ``torch_batched``: ``rssm_rollout_ref`` (members batched with ``baddbmm``).
- ``torch_cuda_graph``: that batched form captured once and replayed as a CUDA graph.
- ``torch_compile``: ``torch.compile`` of the batched form (GPU only; the loop over T is
  unrolled, so compile time grows with T).
- ``hybrid_triton_<variant>`` and ``hybrid_triton_graph_<variant>`` (target point only): the
  kernel variants of ``ALSO_AT_TARGET`` beside the default, direct call and graph replay
  (the in-kernel fold of issue 4, until GPU figures decide the default).

Curves are separate cases: over K (1-16), H (64-1024) and T (1-200) around the target point
K=5, H=256, I=64, T=50, batch 1. ``metric="latency"``: no bandwidth is claimed.

Standalone: ``python benchmarks/kernels_rssm.py --csv out.csv [--quick] [--compile WHERE]
[--variant NAME]`` (WHERE: target, all or none; NAME: a kernel variant, see sweep_rssm.py)
times every case (do_bench median on CUDA) and writes a
long-format CSV.
"""

from __future__ import annotations

import argparse
import csv

import torch
from hybrid_triton.kernels.rssm import (
    RolloutGraph,
    RSSMFeedback,
    RSSMWeights,
    make_workspace,
    rssm_rollout,
    rssm_rollout_ref,
)

from hybrid_triton.bench.kernel_case import CaseRun, KernelCase

TARGET = dict(K=5, H=256, T=50)
INPUTS, LATENT, OUTPUTS, BATCH = 64, 32, 5, 1
# Variants (rollout.VARIANTS) also timed at the target point, beside the default: one more
# compile each, so only at the one point (the rssm family has its own time limit on the GPU).
ALSO_AT_TARGET = ("folded_inkernel_w8",)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(K: int, H: int, device: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    I, S, O, B = INPUTS, LATENT, OUTPUTS, BATCH  # noqa: E741 (the math's names)

    def w(*shape, fan_in):
        return (torch.randn(*shape, generator=gen) / fan_in**0.5).to(device)

    weights = RSSMWeights(
        w(K, 3 * H, I + S, fan_in=I + S),
        w(K, 3 * H, H, fan_in=H),
        w(K, 3 * H, fan_in=4),
        w(K, 3 * H, fan_in=4),
        w(K, S, H, fan_in=H),
        w(K, S, fan_in=4),
        w(K, O, H + S, fan_in=H + S),
        w(K, O, fan_in=4),
    )
    # A contractive feedback loop (gain well below 1), as a trained model's is: with a gain
    # above 1 long rollouts overflow fp32 and nothing can be compared.
    mix = torch.eye(I) * 0.5
    feedback = RSSMFeedback(
        w(O, I, fan_in=I) * 0.5,
        mix.to(device),
        w(I, O, fan_in=O) * 0.1,
        torch.zeros(I, device=device),
    )
    x0 = w(B, I, fan_in=1)
    h0 = w(K, B, H, fan_in=1).tanh()
    z0 = w(K, B, S, fan_in=1)
    return x0, h0, z0, weights, feedback


def torch_graph_replay(problem, T: int):
    """The batched torch rollout captured once as a CUDA graph; returns its ``replay``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (cuBLAS handles, allocations)
        for _ in range(2):
            rssm_rollout_ref(*problem, T)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rssm_rollout_ref(*problem, T)
    return graph.replay


def _eager_loop(x0, h0, z0, weights, feedback, T):
    trajs = []
    for k in range(h0.shape[0]):
        member = RSSMWeights(*(t[k : k + 1] for t in weights))
        trajs.append(rssm_rollout_ref(x0, h0[k : k + 1], z0[k : k + 1], member, feedback, T).traj)
    traj = torch.cat(trajs)
    return traj, traj.mean(0), traj.var(0, unbiased=False)


def _case(
    K: int,
    H: int,
    T: int,
    curve: str,
    with_compile: bool,
    split: int | None = None,
    variant: str | None = None,
    also: tuple[str, ...] = (),
) -> KernelCase:
    def setup() -> CaseRun:
        device = _device()
        problem = make_inputs(K, H, device)
        workspace = make_workspace(K, BATCH, H, device)
        providers = {
            "hybrid_triton": lambda: rssm_rollout(
                *problem, T, split=split, workspace=workspace, variant=variant
            ),
            "hybrid_triton_single": lambda: rssm_rollout(
                *problem, T, split=1, workspace=workspace, variant=variant
            ),
            "torch_eager": lambda: _eager_loop(*problem, T),
            "torch_batched": lambda: rssm_rollout_ref(*problem, T),
        }
        for other in also:
            providers[f"hybrid_triton_{other}"] = lambda v=other: rssm_rollout(
                *problem, T, split=split, workspace=workspace, variant=v
            )
        if device == "cuda":
            providers["torch_cuda_graph"] = torch_graph_replay(problem, T)
            rollout_graph = RolloutGraph(*problem, T, split=split, variant=variant)
            providers["hybrid_triton_graph"] = rollout_graph.replay
            for other in also:
                graph = RolloutGraph(*problem, T, split=split, variant=other)
                providers[f"hybrid_triton_graph_{other}"] = graph.replay
            if with_compile:
                compiled = torch.compile(rssm_rollout_ref)
                providers["torch_compile"] = lambda: compiled(*problem, T)

        def check() -> None:
            expected = rssm_rollout_ref(
                problem[0].double(), problem[1].double(), problem[2].double(), *problem[3:], T
            )
            ours = [("hybrid_triton", providers["hybrid_triton"])]
            ours += [("single", providers["hybrid_triton_single"])]
            if "hybrid_triton_graph" in providers:
                ours += [("graph", providers["hybrid_triton_graph"])]
            for other in also:
                ours += [(other, providers[f"hybrid_triton_{other}"])]
                if f"hybrid_triton_graph_{other}" in providers:
                    ours += [(f"graph {other}", providers[f"hybrid_triton_graph_{other}"])]
            for name, fn in ours:
                got = fn()
                for field in ("traj", "mean", "var"):
                    torch.testing.assert_close(
                        getattr(got, field).double(),
                        getattr(expected, field),
                        atol=1e-4,
                        rtol=1e-3,
                        msg=lambda m, n=name, f=field: f"{n}.{f}: {m}",
                    )

        return CaseRun(providers=providers, check=check)

    return KernelCase(
        family="rssm",
        name=f"rssm_rollout {curve}",
        size_label=f"K={K} H={H} T={T}",
        numel=K * 3 * H * (H + INPUTS + LATENT),
        bytes_moved=0,
        setup=setup,
        config=dict(K=K, H=H, T=T, I=INPUTS, S=LATENT, O=OUTPUTS, B=BATCH, curve=curve),
        metric="latency",
    )


def points(quick: bool) -> list[tuple[int, int, int, str]]:
    if quick:
        # CPU: the interpreter runs these in seconds each; the shapes only prove the plumbing.
        return [(2, 16, 2, "target"), (1, 17, 1, "H")]
    pts = [(TARGET["K"], TARGET["H"], TARGET["T"], "target")]
    pts += [(k, 256, 50, "K") for k in (1, 2, 8, 16)]
    pts += [(5, h, 50, "H") for h in (64, 128, 512, 1024)]
    pts += [(5, 256, t, "T") for t in (1, 10, 100, 200)]
    return pts


def cases(
    quick: bool,
    compile_points: str = "target",
    split: int | None = None,
    variant: str | None = None,
) -> list[KernelCase]:
    out = []
    for K, H, T, curve in points(quick):
        with_compile = not quick and (
            compile_points == "all" or (compile_points == "target" and curve == "target")
        )
        also = tuple(v for v in ALSO_AT_TARGET if v != variant) if curve == "target" else ()
        out.append(_case(K, H, T, curve, with_compile, split, variant, also))
    return out


def main() -> None:
    from hybrid_triton.bench.timing import time_cpu

    parser = argparse.ArgumentParser(description="RSSM rollout latency")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", default="target", choices=["all", "target", "none"])
    parser.add_argument("--no-split", action="store_true", help="hybrid_triton with split=1")
    parser.add_argument(
        "--variant", default=None, help="a name of rollout.VARIANTS (default: per H)"
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    machine = torch.cuda.get_device_name() if cuda else "cpu"
    with open(args.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["case", "size", "provider", "median_us", "p20_us", "p80_us", "device", "config"]
        )
        split = 1 if args.no_split else None
        for case in cases(args.quick, args.compile, split, args.variant):
            run = case.setup()
            run.check()
            for provider, fn in run.providers.items():
                if cuda:
                    import triton.testing

                    fn()
                    torch.cuda.synchronize()
                    q = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
                    med, p20, p80 = (v * 1e3 for v in q)
                else:
                    t = time_cpu(fn, warmup=1, repeats=3)
                    med, p20, p80 = t.median_ms * 1e3, t.p20_ms * 1e3, t.p80_ms * 1e3
                writer.writerow(
                    [
                        case.name,
                        case.size_label,
                        provider,
                        f"{med:.1f}",
                        f"{p20:.1f}",
                        f"{p80:.1f}",
                        machine,
                        case.config,
                    ]
                )
                f.flush()
                print(
                    f"{case.name:28s} {case.size_label:20s} {provider:22s} {med:10.1f} us",
                    flush=True,
                )
            del run


if __name__ == "__main__":
    main()
