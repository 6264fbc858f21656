"""Which implementation of a qoq op runs: the Triton kernel or the torch reference.

The choice is made once per op call from the `kernels` option and the tensor's device, so
the same graph runs on a GPU, on a CPU under the Triton interpreter, and on a plain CPU.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

import torch

KERNEL_CHOICES = ("auto", "triton", "reference")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor, kernels: str) -> bool:
    """Resolve `kernels` ("auto", "triton" or "reference") for a tensor on its device."""
    if kernels == "reference":
        return False
    runnable = t.is_cuda or (t.device.type == "cpu" and interpreter_enabled())
    if kernels == "triton":
        if not runnable:
            raise RuntimeError(
                f"kernels='triton' was asked for, but a tensor is on {t.device} and "
                "TRITON_INTERPRET is not set: run on a CUDA GPU, set TRITON_INTERPRET=1 before "
                "importing triton, or use kernels='auto' / 'reference'."
            )
        return True
    if kernels == "auto":
        return runnable
    raise ValueError(f"kernels={kernels!r}: expected one of {KERNEL_CHOICES}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def allocate_outside_graph_pools(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run `make()` (a CUDA allocation meant to outlive this call: a workspace kept across calls) where
    no CUDA-graph memory pool catches it. torch.compile's CUDA graphs route every allocation of the
    current thread into the graph's private pool during warm-up and capture, and a tensor left alive
    there is an error ("tensor(s) in the cudagraph pool not tracked as outputs") or, worse, memory the
    pool reuses under us. A helper thread allocates from the ordinary pool, on a stream of its own,
    and waits for the initialising kernel before handing the tensor over."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "qoq: a kernel workspace (split-K counters) was first needed while a CUDA graph was being captured, "
            "where no memory may be allocated for good. Run the compiled model (or op) once before capturing, on "
            "the stream the capture uses (workspaces are per stream: torch.cuda.graph(g, stream=s) after a run on "
            "s); torch.compile's mode='reduce-overhead' does that warm-up itself."
        )
    made: list = []
    failed: list = []
    device = torch.cuda.current_device()  # a new thread starts on device 0

    def work() -> None:
        try:
            torch.cuda.set_device(device)
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                made.append(make())
            side.synchronize()
        except BaseException as e:  # re-raised in the caller's thread
            failed.append(e)

    worker = threading.Thread(target=work, name="qoq-workspace-alloc")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]
