"""AdamW in numpy, in place, with exactly ``torch.optim.AdamW``'s update, and its state as safetensors.

Why it exists: the portable ``onnx`` engine runs on plain onnxruntime, which has no
optimizer, and the edge never imports torch. The trainable parameters live in one flat
float32 buffer (``FlatParameters``: named views into it, which the engine hands to
onnxruntime without copying), so a step is a handful of vectorised numpy operations over
the whole model, done chunk by chunk with two small scratch arrays instead of
parameter-sized temporaries (peak memory stays at parameters + gradients + two moments).

The arithmetic is torch's single-tensor AdamW (what ``torch.optim.AdamW`` runs on CPU),
in float32, in torch's order::

    step += 1
    p *= 1 - lr·wd
    m += (1 - β1)·(g - m)                    # exp_avg.lerp_(g, 1 - β1)
    v = v·β2 + ((1 - β2)·g)·g                # exp_avg_sq.mul_(β2).addcmul_(g, g, 1 - β2)
    p += (-lr / (1 - β1^step))·m / (√v / √(1 - β2^step) + eps)

torch's vectorised ``lerp`` uses a fused multiply-add, so the two can differ by an ulp.
State (parameters, both moments by parameter name, the step count and the learning rate)
is one safetensors file written and read with ``safetensors.numpy``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

CHUNK = 1 << 17  # elements per vectorised slice of a step: 512 KiB of float32, cache-sized
_STEP, _LR = "step", "lr"
_PARAM, _EXP_AVG, _EXP_AVG_SQ = "param/", "exp_avg/", "exp_avg_sq/"


class FlatParameters:
    """Named float32 arrays stored back to back in one contiguous buffer."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.shapes = {name: tuple(a.shape) for name, a in arrays.items()}
        sizes = [int(np.prod(shape)) for shape in self.shapes.values()]
        self.offsets = dict(zip(self.shapes, np.cumsum([0, *sizes[:-1]]).tolist()))
        self.buffer = np.empty(sum(sizes), dtype=np.float32)
        self.views = self.split(self.buffer)
        for name, array in arrays.items():
            self.views[name][...] = array

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of ``flat`` (laid out like ``buffer``), one per parameter, by name."""
        return {
            name: flat[self.offsets[name]:self.offsets[name] + int(np.prod(shape))].reshape(shape)
            for name, shape in self.shapes.items()
        }


class AdamW:
    """``torch.optim.AdamW`` (one parameter group, no amsgrad) over a ``FlatParameters`` buffer."""

    def __init__(
        self, params: FlatParameters, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
    ) -> None:
        self.params = params
        self.lr = float(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.step_count = 0
        self.exp_avg = np.zeros_like(params.buffer)
        self.exp_avg_sq = np.zeros_like(params.buffer)

    def step(self, grads: np.ndarray) -> None:
        """One update of every parameter in place; ``grads`` is laid out like ``params.buffer``."""
        if grads.shape != self.params.buffer.shape or grads.dtype != np.float32:
            raise ValueError(f"gradients must be float32 of shape {self.params.buffer.shape}, "
                             f"got {grads.dtype} {grads.shape}")
        self.step_count += 1
        f32 = np.float32
        decay = f32(1.0 - self.lr * self.weight_decay)
        step_size = f32(-(self.lr / (1.0 - self.beta1**self.step_count)))
        bias_correction2_sqrt = f32((1.0 - self.beta2**self.step_count) ** 0.5)
        one_minus_beta1, one_minus_beta2 = f32(1.0 - self.beta1), f32(1.0 - self.beta2)
        beta2, eps = f32(self.beta2), f32(self.eps)
        scratch = np.empty(min(CHUNK, grads.size), np.float32), np.empty(min(CHUNK, grads.size), np.float32)
        for start in range(0, grads.size, CHUNK):
            chunk = slice(start, start + CHUNK)
            p, g, m, v = self.params.buffer[chunk], grads[chunk], self.exp_avg[chunk], self.exp_avg_sq[chunk]
            a, b = (s[: p.size] for s in scratch)
            p *= decay
            np.subtract(g, m, out=a)
            a *= one_minus_beta1
            m += a
            v *= beta2
            np.multiply(g, one_minus_beta2, out=a)
            a *= g
            v += a
            np.sqrt(v, out=a)
            a /= bias_correction2_sqrt
            a += eps
            np.multiply(m, step_size, out=b)
            b /= a
            p += b

    def _flat_state(self) -> tuple[tuple[str, np.ndarray], ...]:
        return (_PARAM, self.params.buffer), (_EXP_AVG, self.exp_avg), (_EXP_AVG_SQ, self.exp_avg_sq)

    def save(self, path: Path, *, metadata: dict[str, str]) -> None:
        """Parameters, moments, step count and learning rate, by parameter name, as safetensors."""
        tensors = {_STEP: np.array(self.step_count, np.int64), _LR: np.array(self.lr, np.float64)}
        for prefix, flat in self._flat_state():
            tensors |= {prefix + name: view for name, view in self.params.split(flat).items()}
        save_file(tensors, str(path), metadata=metadata)

    def restore(self, path: Path, *, metadata: dict[str, str]) -> None:
        """Load what ``save`` wrote, in place (the parameter views stay valid); refuses other metadata or layouts."""
        with safe_open(str(path), framework="np") as f:
            if f.metadata() != metadata:
                raise ValueError(f"{path} was saved for {f.metadata()}, not {metadata}")
            expected = {_STEP, _LR} | {p + n for p in (_PARAM, _EXP_AVG, _EXP_AVG_SQ) for n in self.params.shapes}
            if set(f.keys()) != expected:
                raise ValueError(f"{path} holds other tensors than this optimizer's: "
                                 f"{sorted(set(f.keys()) ^ expected)[:5]}")
            for prefix, flat in self._flat_state():
                for name, view in self.params.split(flat).items():
                    _copy_checked(f.get_tensor(prefix + name), view, where=f"{path}: {prefix}{name}")
            self.step_count = int(f.get_tensor(_STEP))
            self.lr = float(f.get_tensor(_LR))


def _copy_checked(source: np.ndarray, target: np.ndarray, *, where: str) -> None:
    if source.shape != target.shape or source.dtype != target.dtype:
        raise ValueError(f"{where} is {source.dtype} {source.shape}, expected {target.dtype} {target.shape}")
    target[...] = source
