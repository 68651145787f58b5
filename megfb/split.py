"""A training step on every core: the batch split over MegEngine's CPU devices, in one process.

MegEngine's CPU device "cpu0" runs its kernels on one worker thread; "cpu1" is another device
with its own worker thread. The step keeps a replica of the model on each device and gives
each a share of the batch. Python only queues kernels (MegEngine dispatches asynchronously),
so both workers compute at once: the forward of every share, then one backward over every
share's loss, each on its own device. The replicas' gradients are summed on cpu0, the optimizer
updates the cpu0 model, and the new weights are copied to the other replicas before the next
forward. Each share's loss is weighted by its share of the batch, so the step computes the
one-device step's gradient and update (every loss of megfb/losses.py is a mean over the batch);
tests/test_train.py checks that to float rounding.

Nothing is shared between processes (no distributed launcher). Weights and gradients move
between devices through host memory (host_copy): MegEngine 1.13's own device-to-device copy
made one gradient wrong now and then (a source freed while its copy was still queued).
"""
import copy

import megengine as mge
import numpy as np
from megengine.autodiff import GradManager
from megengine.core._imperative_rt.common import CompNode


def wait():
    """Block until every device's queued kernels are done (the interpreter's own sync,
    mge._full_sync, does not wait for the other devices' workers; CompNode._sync_all does)."""
    mge._full_sync()
    CompNode._sync_all()


def host_copy(tensor, device):
    """`tensor` on `device`, through host memory: MegEngine's own device-to-device copy (.to())
    gave wrong values now and then; .numpy() waits for the value and copies it.
    Only weights and gradients travel this way (~0.4 MB for FBRestormer), never activations."""
    return mge.tensor(tensor.numpy(), device=device)


def move_module(module, device):
    """Every parameter and buffer of `module` onto `device`, in place (the same Parameter objects)."""
    wait()
    for _, tensor in module.named_tensors():
        tensor._reset(host_copy(tensor, device))
    wait()
    return module


def shares(batch, parts):
    """Sizes of `parts` near-equal shares of a batch (the first ones one larger)."""
    return [batch // parts + (i < batch % parts) for i in range(parts)]


class SplitStep:
    """Forward + backward of one batch over `devices`; the gradients end on `model` (cpu0).

    model: the trained module, moved to devices[0] (it keeps its Parameters, so an optimizer and
    checkpoints made for it still apply). After each optimizer step call `sync_weights()`.
    """

    def __init__(self, model, devices):
        self.devices = list(devices)
        self.model = move_module(model, self.devices[0])
        self.replicas = [model] + [move_module(copy.deepcopy(model), d) for d in self.devices[1:]]
        self.params = [list(m.parameters()) for m in self.replicas]
        self.gm = GradManager().attach([p for ps in self.params for p in ps])

    def sync_weights(self):
        """Copy the cpu0 model's parameters and buffers to every other replica."""
        wait()
        source = list(self.model.named_tensors())
        for replica, device in zip(self.replicas[1:], self.devices[1:]):
            for (_, src), (_, dst) in zip(source, replica.named_tensors()):
                dst._reset(host_copy(src, device))
        wait()

    def train(self, mode=True):
        for m in self.replicas:
            m.train(mode)

    def __call__(self, noisy, clean, loss_fn):
        """noisy, clean: numpy (B, ...) batches. loss_fn(outputs, clean) -> (loss, per_step).
        Returns (loss, per_step) of the whole batch, as tensors on devices[0]; the gradients
        are in the cpu0 model's Parameters' .grad."""
        sizes = [n for n in shares(len(noisy), len(self.devices)) if n]
        losses, per_steps, inputs, start = [], [], [], 0
        with self.gm:
            for replica, device, n in zip(self.replicas, self.devices, sizes):
                x, y = (mge.tensor(np.array(a[start:start + n], dtype=np.float32), device=device)
                        for a in (noisy, clean))
                inputs.append((x, y))  # alive until every device is done with them
                outputs = replica(x)
                loss, steps = loss_fn(outputs, y)
                weight = n / len(noisy)
                losses.append(loss * weight)
                per_steps.append([s * weight for s in steps])
                start += n
            # one backward over every device's loss: no copy between devices inside the graph
            self.gm.backward(losses)
        wait()
        home = self.devices[0]
        copies = [(p0, p, host_copy(p.grad, home)) for replica_params in self.params[1:len(sizes)]
                  for p0, p in zip(self.params[0], replica_params) if p.grad is not None]
        wait()
        for p0, p, g in copies:
            p0.grad = g if p0.grad is None else p0.grad + g
            p.grad = None
        total = mge.tensor(sum(float(t.item()) for t in losses), device=home)
        per_step = [mge.tensor(sum(float(s[k].item()) for s in per_steps), device=home)
                    for k in range(len(per_steps[0]))]
        wait()
        return total, per_step
