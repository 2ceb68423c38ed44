"""Copies between the host and the model's GPU that do not wait for the GPU.

A batch goes to the device from pinned memory (:func:`to_device`), so the copy does not wait
for the batch still running there; its result comes back into pinned memory behind the model
on the same stream (:func:`copy_to_host`), and only :meth:`Pending.result` waits, for that
copy alone. Meanwhile the caller prepares the next batch or writes the last one's labels. On
the CPU both are plain copies and the result is ready at once.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar, Union

import torch

from ..devices import on_device

T = TypeVar("T")


def to_device(tensor: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a GPU through pinned memory, without blocking."""
    device = torch.device(device)
    # from pinned memory a copy to the GPU does not wait for the batch still running there
    pin = device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned()
    if not pin:
        return tensor.to(device, non_blocking=True)
    with on_device(device):  # pinned for the model's GPU (pin_memory() pins for the current one)
        return tensor.pin_memory().to(device, non_blocking=True)


class Pending(Generic[T]):
    """A result queued on the model's device; :meth:`result` waits for it."""

    def __init__(self, wait: Callable[[], T]):
        self._wait = wait

    def result(self) -> T:
        return self._wait()


def copy_to_host(values: torch.Tensor, finish: Callable[[torch.Tensor], T]) -> Pending[T]:
    """``finish(values on the host)``, as a :class:`Pending`: computed at once for values on the
    CPU; for values on a GPU, once the copy queued here behind the model has arrived."""
    if values.device.type != "cuda":
        done = finish(values.cpu())
        return Pending(lambda: done)
    # Copy into pinned memory behind the model on the same stream; the event marks its end
    # (a plain .cpu() later would also wait for every batch queued after this one).
    # On the model's GPU, not the current one: the pinned memory, the copy and the event that ends it.
    with on_device(values.device):
        host = torch.empty(values.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(values, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(values.device))

    def wait() -> T:
        copied.synchronize()
        return finish(host)

    return Pending(wait)
