"""AdamW in numpy, in place, with exactly ``torch.optim.AdamW``'s update, and its state as safetensors.

Why it exists: the portable ``onnx`` engine runs on plain onnxruntime, which has no
optimizer, and the edge never imports torch. The trainable parameters live in one flat
float32 buffer (``FlatParameters``: named views into it, which the engine hands to
onnxruntime without copying), so a step is a handful of vectorised numpy operations over
the whole model, done chunk by chunk with two small scratch arrays instead of
parameter-sized temporaries (peak memory stays at parameters + gradients + two moments).

``moments="bf16"`` keeps both moments as bfloat16 (numpy has no such dtype: uint16 arrays
holding the upper half of each float32's bits), half the optimizer state in memory and in
checkpoints. Each chunk's moments are widened exactly to float32, updated and used for this
step's update in float32, then rounded to nearest (ties to even) for storage; only what is
carried to the next step is rounded. The exact float32 path stays the default.

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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from splitwire.manifest import MOMENT_DTYPES

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
    """``torch.optim.AdamW`` (no amsgrad) over a ``FlatParameters`` buffer.

    ``lr_scales``: parameters that train at a multiple of ``lr`` (torch: a parameter group of their own
    whose rate is that multiple); the others train at ``lr``.
    """

    def __init__(
        self, params: FlatParameters, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
        moments: str = "fp32", lr_scales: dict[str, float] | None = None,
    ) -> None:
        if moments not in MOMENT_DTYPES:
            raise ValueError(f"moments must be one of {', '.join(MOMENT_DTYPES)}, got {moments!r}")
        unknown = set(lr_scales or ()) - set(params.shapes)
        if unknown:
            raise ValueError(f"lr_scales names no trainable parameter: {sorted(unknown)[:5]}")
        self.params = params
        self._segments = _segments(params, lr_scales or {})
        self.moments = moments
        self.lr = float(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.step_count = 0
        dtype = np.float32 if moments == "fp32" else np.uint16  # bf16: the upper half of each float32's bits
        self.exp_avg = np.zeros(params.buffer.shape, dtype)
        self.exp_avg_sq = np.zeros(params.buffer.shape, dtype)

    def step(self, grads: np.ndarray) -> None:
        """One update of every parameter in place; ``grads`` is laid out like ``params.buffer``."""
        if grads.shape != self.params.buffer.shape or grads.dtype != np.float32:
            raise ValueError(f"gradients must be float32 of shape {self.params.buffer.shape}, "
                             f"got {grads.dtype} {grads.shape}")
        self.step_count += 1
        size = min(CHUNK, grads.size)
        scratch = [np.empty(size, np.float32) for _ in range(2 if self.moments == "fp32" else 4)]
        for (first, end), scale in self._segments:
            constants = self._constants(self.lr * scale)
            for start in range(first, end, CHUNK):
                chunk = slice(start, min(start + CHUNK, end))
                p, g, m, v = self.params.buffer[chunk], grads[chunk], self.exp_avg[chunk], self.exp_avg_sq[chunk]
                a, b, *wide = (s[: p.size] for s in scratch)
                if self.moments == "fp32":
                    _update(p, g, m, v, a, b, constants)
                    continue
                m32, v32 = (_from_bf16(x, out) for x, out in ((m, wide[0]), (v, wide[1])))
                _update(p, g, m32, v32, a, b, constants)
                _to_bf16(m32, m, a)
                _to_bf16(v32, v, a)

    def _constants(self, lr: float) -> "_Constants":
        """This step's float32 constants at rate ``lr``."""
        f32 = np.float32
        return _Constants(
            decay=f32(1.0 - lr * self.weight_decay),
            step_size=f32(-(lr / (1.0 - self.beta1**self.step_count))),
            bias_correction2_sqrt=f32((1.0 - self.beta2**self.step_count) ** 0.5),
            one_minus_beta1=f32(1.0 - self.beta1), one_minus_beta2=f32(1.0 - self.beta2),
            beta2=f32(self.beta2), eps=f32(self.eps))

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


def _segments(params: FlatParameters, lr_scales: dict[str, float]) -> list[tuple[tuple[int, int], float]]:
    """The buffer as runs of parameters at one rate multiple: ``((start, end), scale)``, in buffer order."""
    runs: list[tuple[tuple[int, int], float]] = []
    for name, shape in params.shapes.items():
        start, scale = params.offsets[name], float(lr_scales.get(name, 1.0))
        end = start + int(np.prod(shape))
        if runs and runs[-1][1] == scale and runs[-1][0][1] == start:
            runs[-1] = ((runs[-1][0][0], end), scale)
        else:
            runs.append(((start, end), scale))
    return runs


@dataclass(frozen=True)
class _Constants:
    """A step's scalars, float32 as torch computes them."""

    decay: np.float32
    step_size: np.float32
    bias_correction2_sqrt: np.float32
    one_minus_beta1: np.float32
    one_minus_beta2: np.float32
    beta2: np.float32
    eps: np.float32


def _update(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray,
            c: _Constants) -> None:
    """torch's AdamW arithmetic on one chunk, in place on ``p``, ``m`` and ``v`` (``a``, ``b``: scratch)."""
    p *= c.decay
    np.subtract(g, m, out=a)
    a *= c.one_minus_beta1
    m += a
    v *= c.beta2
    np.multiply(g, c.one_minus_beta2, out=a)
    a *= g
    v += a
    np.sqrt(v, out=a)
    a /= c.bias_correction2_sqrt
    a += c.eps
    np.multiply(m, c.step_size, out=b)
    b /= a
    p += b


def _from_bf16(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bfloat16 values (uint16 bit patterns) widened exactly into float32 ``out``."""
    wide = out.view(np.uint32)
    np.left_shift(bits, 16, out=wide, dtype=np.uint32)
    return out


def _to_bf16(values: np.ndarray, bits: np.ndarray, scratch: np.ndarray) -> None:
    """Round finite float32 ``values`` to the nearest bfloat16 (ties to even) into ``bits``; clobbers ``values``
    and ``scratch`` (float32 of the same size)."""
    wide, carry = values.view(np.uint32), scratch.view(np.uint32)
    np.right_shift(wide, 16, out=carry)
    carry &= np.uint32(1)  # the lowest bit kept: a tie rounds toward even
    carry += np.uint32(0x7FFF)
    wide += carry
    np.right_shift(wide, 16, out=bits, casting="unsafe")


def _copy_checked(source: np.ndarray, target: np.ndarray, *, where: str) -> None:
    if source.shape != target.shape or source.dtype != target.dtype:
        raise ValueError(f"{where} is {source.dtype} {source.shape}, expected {target.dtype} {target.shape}")
    target[...] = source
