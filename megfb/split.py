"""A training step on every core: the batch split over MegEngine's CPU devices, in one process.

The home device is the trainer's: MegEngine's inline CPU device "cpu:default", whose kernels
run on the eager interpreter's own thread. "cpu1" (and cpu2, ...) is a device with a worker
thread of its own. The step keeps a replica of the model on each device and gives each a share
of the batch. Python only queues kernels (MegEngine dispatches asynchronously): the worker
replicas' forward and backward are queued first, then the home replica's are computed on the
interpreter's thread while the workers compute theirs, each with its own GradManager. The
replicas' gradients are summed at home, the optimizer updates the home model, and the new
weights are copied to the other replicas before the next forward. Each share's loss is
weighted by its share of the batch, so the step computes the one-device step's gradient and
update (every loss of megfb/losses.py is a mean over the batch); tests/test_train.py checks
that to float rounding.

Nothing is shared between processes (no distributed launcher). Weights and gradients move
between devices through host memory (host_copy): MegEngine 1.13's own device-to-device copy
made one gradient wrong now and then (a source freed while its copy was still queued).
"""
import copy

import megengine as mge
import numpy as np
from megengine.autodiff import GradManager

from .native import wait_all as wait


def host_copy(tensor, device):
    """`tensor` on `device`, through host memory: MegEngine's own device-to-device copy (.to())
    gave wrong values now and then; .numpy() waits for the value and copies it.
    Only weights and gradients travel this way (~0.4 MB for FBRestormer), never activations."""
    return mge.tensor(tensor.numpy(), device=device)


def move_module(module, device):
    """Every parameter and buffer of `module` onto `device`, in place (the same Parameter objects)."""
    wait()
    for _, tensor in module.named_tensors():
        names = _names(tensor)
        tensor._reset(host_copy(tensor, device))
        _set_names(tensor, names)
    wait()
    return module


_NAME_FIELDS = ("_name", "_short_name", "_prefix", "_custom_name")


def _names(tensor):
    return {k: getattr(tensor, k, None) for k in _NAME_FIELDS}


def _set_names(tensor, names):
    """The module's names for a tensor (a dumped graph's weights are named by them)."""
    for key, value in names.items():
        if value is not None:
            setattr(tensor, key, value)
    if names.get("_name"):
        tensor._set_name(names["_name"])


def copy_module(module, device):
    """A deep copy of `module` with every tensor on `device`, named as the original's."""
    twin = copy.deepcopy(module)
    for (_, src), (_, dst) in zip(module.named_tensors(), twin.named_tensors()):
        _set_names(dst, _names(src))
    return move_module(twin, device)


# A replica on the home device computes faster per sample than one on a worker device, so it
# takes more of the batch: the home device (the trainer's inline one) runs megfb's operators,
# a worker device MegEngine's kernels. docs/measure_devices.py times the split step for
# several weights side by side; 1.5 (5 of 8 samples at home) is what it chose on this
# project's 2-core machine (README, Benchmarks).
HOME_WEIGHT = 1.5


def shares(batch, parts, home_weight=1.0):
    """Sizes of `parts` shares of a batch, the first (home) weighted `home_weight` against 1
    for each other; rounded by largest remainder (ties to the first)."""
    weights = [float(home_weight)] + [1.0] * (parts - 1)
    exact = [batch * w / sum(weights) for w in weights]
    sizes = [int(e) for e in exact]
    for i in sorted(range(parts), key=lambda i: (sizes[i] - exact[i], i))[:batch - sum(sizes)]:
        sizes[i] += 1
    return sizes


class SplitStep:
    """Forward + backward of one batch over `devices`; the gradients end on `model` (devices[0]).

    model: the trained module, moved to devices[0], the home device (it keeps its Parameters,
    so an optimizer and checkpoints made for it still apply); the trainer's is MegEngine's
    inline CPU device (megfb/native.py INLINE_DEVICE), whose kernels run on the interpreter's
    own thread. Each other device (cpu1, ...) gets a replica and its share of the batch, and
    its forward and backward are queued first, with MegEngine's kernels only: megfb's operators
    would make the interpreter wait for that device. The home replica's forward and backward
    (megfb's operators on) are computed after, on the interpreter's thread, while the worker
    threads compute theirs. After each optimizer step call `sync_weights()`.
    """

    def __init__(self, model, devices, home_weight=HOME_WEIGHT):
        self.devices = list(devices)
        self.home_weight = home_weight
        self.model = move_module(model, self.devices[0])
        self.replicas = [model] + [copy_module(model, d) for d in self.devices[1:]]
        self.params = [list(m.parameters()) for m in self.replicas]
        self.gms = [GradManager().attach(ps) for ps in self.params]
        self.gm = self.gms[0]

    def sync_weights(self):
        """Copy the home model's parameters and buffers to every other replica."""
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
        are in the home model's Parameters' .grad."""
        from .ops import use_native

        sizes = shares(len(noisy), len(self.devices), self.home_weight)
        starts = np.cumsum([0] + sizes)
        losses, per_steps, inputs = {}, {}, []
        # the worker devices first: their kernels queue on their own threads, then the home
        # device's are computed on this interpreter thread meanwhile
        for i in [*range(1, len(self.devices)), 0]:
            n = sizes[i]
            if not n:
                continue
            x, y = (mge.tensor(np.array(a[starts[i]:starts[i] + n], dtype=np.float32), device=self.devices[i])
                    for a in (noisy, clean))
            inputs.append((x, y))  # alive until every device is done with them
            previous = use_native(False) if i else None
            try:
                with self.gms[i]:
                    loss, steps = loss_fn(self.replicas[i](x), y)
                    weight = n / len(noisy)
                    losses[i] = loss * weight
                    per_steps[i] = [s * weight for s in steps]
                    self.gms[i].backward(losses[i])
            finally:
                if i:
                    use_native(previous)
        wait()
        home = self.devices[0]
        copies = [(p0, p, host_copy(p.grad, home)) for i in losses if i
                  for p0, p in zip(self.params[0], self.params[i]) if p.grad is not None]
        wait()
        for p0, p, g in copies:
            p0.grad = g if p0.grad is None else p0.grad + g
            p.grad = None
        total = mge.tensor(sum(float(t.item()) for t in losses.values()), device=home)
        count = len(next(iter(per_steps.values())))
        per_step = [mge.tensor(sum(float(s[k].item()) for s in per_steps.values()), device=home)
                    for k in range(count)]
        wait()
        return total, per_step
