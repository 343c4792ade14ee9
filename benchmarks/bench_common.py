"""Shared pieces of the benchmark scripts: timing, importing the PyTorch references, the result table."""
import statistics
import time


def median_seconds(fn, steps: int) -> float:
    """Median wall time of `fn()` over `steps` runs after one warm-up (and compilation) run."""
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def install_torch_guard() -> None:
    """Makes timm / transformers importable next to a CUDA torchvision (see jaxseg/testing/torch_guard.py)."""
    from jaxseg.testing import torch_guard

    torch_guard.install()


def print_table(title: str, batch: int, rows: list, timings: tuple) -> None:
    """Markdown table of `rows` = [(implementation, {timing name: seconds, "peak GiB"?: float})] with
    ms and images/s per timing, then the time ratio of the first row to the second."""
    print(title)
    print("| implementation | " + " | ".join(f"{t} ms | images/s" for t in timings) + " | peak GiB |")
    print("|---|" + "---|---|" * len(timings) + "---|")
    for name, r in rows:
        cells = " | ".join(f"{r[t] * 1e3:.1f} | {batch / r[t]:.2f}" for t in timings)
        peak = f"{r['peak GiB']:.2f}" if "peak GiB" in r else "-"
        print(f"| {name} | {cells} | {peak} |")
    if len(rows) == 2:
        (ours, a), (reference, b) = rows
        print(f"{ours} / {reference} time ratio: " + ", ".join(f"{t} {a[t] / b[t]:.2f}" for t in timings))


def jax_peak_gib() -> float | None:
    """This process's peak device memory so far, where the JAX backend reports it (GPU, TPU; not CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def torch_device():
    """(device, synchronize, peak GiB or None, reset peak) for the PyTorch references: CUDA when
    available, else the CPU, where PyTorch keeps no allocator statistics."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", lambda: None, lambda: None, lambda: None
    return ("cuda", torch.cuda.synchronize, lambda: torch.cuda.max_memory_allocated() / 2**30,
            torch.cuda.reset_peak_memory_stats)


def shipped_train_step(method, local_batch: dict, rules=None):
    """The trainer's compiled step for `method` on one device (`jaxseg.train.step.make_train_step`, what
    `Trainer.run` executes each step), its initial state and the batch as a global array. Needs neither
    grain nor orbax."""
    import flax.linen as nn
    import jax

    from jaxseg.parallel import DEFAULT_RULES, MeshConfig, global_batch
    from jaxseg.train.step import abstract_train_state, initial_state, make_train_step

    rules = rules or DEFAULT_RULES
    mesh = MeshConfig().make_mesh(jax.devices()[:1])
    init, _, shardings = abstract_train_state(method, 0, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return make_train_step(method, shardings), initial_state(init, shardings, 0), global_batch(local_batch, mesh)


def time_train_step(method, local_batch: dict, steps: int) -> tuple[float, dict]:
    """(XLA temporary MiB, {"train step": median seconds, "peak GiB"?}) of the shipped train step."""
    import jax

    step, state, batch = shipped_train_step(method, local_batch)
    compiled = step.lower(state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    result = {"train step": median_seconds(run, steps)}
    peak = jax_peak_gib()
    if peak is not None:
        result["peak GiB"] = peak
    return temp, result
