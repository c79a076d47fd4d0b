"""PyTorch on the same GPU, the same operations as examples/gpu_check.rs: device copy and linear combinations on
64M f32 elements, and one Euler step with CFG on a 16x128x128 f32 latent, eager and replayed as a CUDA graph."""
import json

import torch


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    dev = torch.device("cuda")
    n = 64 << 20
    a, b, o = (torch.randn(n, device=dev) for _ in range(3))
    nbytes = n * 4
    copy = timed(lambda: o.copy_(a), 50)
    lin1 = timed(lambda: torch.mul(a, 0.5, out=o), 50)
    lin2 = timed(lambda: o.add_(a, alpha=0.5).add_(b, alpha=0.25), 50)
    gbps = lambda rw, ms: rw * nbytes / (ms * 1e-3) / 1e9
    m = 16 * 128 * 128
    unc, con, x = (torch.randn(m, device=dev) for _ in range(3))

    def step():
        den = unc + 3.5 * (con - unc)
        x.add_(den, alpha=-0.05)

    eager = timed(step, 2000) * 1e3
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    graph = timed(g.replay, 2000) * 1e3
    print(f"| torch device copy | {copy:.3f} ms | {gbps(2, copy):.0f} GB/s |")
    print(f"| torch lincomb 1 term | {lin1:.3f} ms | {gbps(2, lin1):.0f} GB/s |")
    print(f"| torch lincomb 2 terms + out (two add_) | {lin2:.3f} ms | {gbps(4, lin2):.0f} GB/s (as one fused op would move) |")
    print(f"| torch Euler+CFG step | eager {eager:.2f} us | CUDA graph {graph:.2f} us |")
    print("TORCH " + json.dumps({"copy_gbps": gbps(2, copy), "lincomb1_gbps": gbps(2, lin1), "lincomb2_gbps": gbps(4, lin2),
                                  "euler_cfg_eager_us": eager, "euler_cfg_graph_us": graph, "gpu": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
