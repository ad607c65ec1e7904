"""Mean Teacher: an EMA copy of the student's trainable parameters that shares the frozen CLIP backbone (paper Eq. 2).

The teacher is a full :class:`~modeling_dearli.DearliForPanopticSegmentation` built with ``copy.deepcopy`` and a memo
that maps the student's frozen parts (the CLIP backbone, the optional text tower, the loss module and the class text
buffers) to themselves, so the teacher reuses those objects instead of copying them: the one frozen backbone exists
once in memory and the teacher's forward is exactly the model's forward code, run with the teacher's decoder weights
in eval mode under ``torch.no_grad``.

Update rule after every optimizer step (all processes compute it identically from the synchronised student)::

    theta_teacher <- gamma_t * theta_teacher + (1 - gamma_t) * theta_student,
    gamma_t = min(1 - 1 / (t + 1), gamma)   (ramp-up, when the teacher was not given its own weights)
    gamma_t = gamma                          (when it was)

where ``t`` counts the EMA updates done so far (``t = 0`` copies the student). Only the student's trainable
parameters are averaged; floating-point buffers of the copied (decoder) modules are copied from the student.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["MeanTeacher", "ema_decay_at", "ema_decay_for_schedule"]

# The paper's schedule: EMA decay 0.999 over 80k iterations, i.e. a horizon 1 / (1 - gamma) of 1/80 of the run.
PAPER_ITERATIONS, PAPER_EMA_DECAY = 80_000, 0.999

# Sub-modules and buffers of DearliForPanopticSegmentation that never change during SSL training: shared, not copied.
_SHARED_MODULES = ("backbone", "text_encoder", "criterion")
_SHARED_BUFFERS = ("text_embeddings", "text_class_index")


def ema_decay_for_schedule(max_train_steps: int) -> float:
    """The EMA decay whose horizon ``1 / (1 - gamma)`` is the same share of `max_train_steps` as the paper's (1,000
    of 80,000 steps): 0.999 at 80k steps, ``1 - 80 / max_train_steps`` in general (0 below 80 steps: the teacher is
    the student), rounded to 4 decimals."""
    return max(0.0, round(1 - PAPER_ITERATIONS * (1 - PAPER_EMA_DECAY) / max_train_steps, 4))


def ema_decay_at(step: int, decay: float, ramp_up: bool) -> float:
    """EMA decay of update number ``step`` (0-based): ``min(1 - 1/(step+1), decay)`` with ramp-up, else ``decay``."""
    if not ramp_up:
        return float(decay)
    return float(min(1.0 - 1.0 / (step + 1), decay))


class MeanTeacher:
    """EMA teacher of a DEARLi student that shares the student's frozen backbone.

    Args:
        student: the student model (wrappers such as DDP are unwrapped).
        decay: the EMA decay ``gamma`` (paper: 0.999).
        ramp_up: use ``gamma_t = min(1 - 1/(t+1), gamma)``; set ``False`` when the teacher is given its own weights
            (see :meth:`load_teacher_weights`).
        teacher_state_dict: optional initial teacher weights (a model ``state_dict``; frozen parts are ignored).
            Giving them switches ``ramp_up`` off unless ``ramp_up`` is passed explicitly.

    The teacher is not an ``nn.Module`` attribute of anything the optimizer or Accelerate sees; it is never put in
    training mode and its parameters have ``requires_grad=False``.
    """

    def __init__(
        self,
        student: nn.Module,
        decay: float = 0.999,
        ramp_up: bool | None = None,
        teacher_state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        student = extract_model_from_parallel(student, keep_torch_compile=False)
        self.decay = float(decay)
        self.ramp_up = (teacher_state_dict is None) if ramp_up is None else bool(ramp_up)
        self.step = 0
        self.teacher = self._build_teacher(student)
        self._param_names = [name for name, p in student.named_parameters() if p.requires_grad]
        if not self._param_names:
            raise ValueError("the student has no trainable parameters to average")
        shared_buffers = {id(b) for m in self._shared_modules(student) for b in m.buffers()}
        shared_buffers |= {id(getattr(student, n)) for n in _SHARED_BUFFERS if getattr(student, n, None) is not None}
        self._buffer_names = [
            name
            for name, b in student.named_buffers()
            if id(b) not in shared_buffers and b.is_floating_point()
        ]
        if teacher_state_dict is not None:
            self.load_teacher_weights(teacher_state_dict)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _shared_modules(student: nn.Module) -> list[nn.Module]:
        return [m for m in (getattr(student, n, None) for n in _SHARED_MODULES) if isinstance(m, nn.Module)]

    def _build_teacher(self, student: nn.Module) -> nn.Module:
        memo: dict[int, Any] = {}
        for module in self._shared_modules(student):
            memo[id(module)] = module
        for name in _SHARED_BUFFERS:
            buffer = getattr(student, name, None)
            if buffer is not None:
                memo[id(buffer)] = buffer
        teacher = copy.deepcopy(student, memo)
        teacher.train(False)
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        if getattr(student, "backbone", None) is not None and teacher.backbone is not student.backbone:
            raise RuntimeError("teacher and student must share the frozen backbone object")
        # Keep the teacher in eval mode whatever a caller does with `.train()`.
        teacher.train = _eval_only_train.__get__(teacher)  # type: ignore[method-assign]
        return teacher

    # ------------------------------------------------------------------ parameters
    def _pairs(self, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student_params = dict(student.named_parameters())
        teacher_params = dict(self.teacher.named_parameters())
        try:
            return [teacher_params[n] for n in self._param_names], [student_params[n] for n in self._param_names]
        except KeyError as error:  # pragma: no cover - defensive
            raise RuntimeError(f"student and teacher parameters differ: {error}") from error

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        return ema_decay_at(self.step, self.decay, self.ramp_up)

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """One EMA step from the (possibly wrapped) student, after its optimizer step. Returns the decay used."""
        student = extract_model_from_parallel(student, keep_torch_compile=False)
        decay = self.current_decay()
        teacher_params, student_params = self._pairs(student)
        student_params = [p.detach().to(t.dtype) for t, p in zip(teacher_params, student_params)]
        if decay == 0.0:
            torch._foreach_copy_(teacher_params, student_params)
        else:
            torch._foreach_lerp_(teacher_params, student_params, 1.0 - decay)
        if self._buffer_names:
            student_buffers = dict(student.named_buffers())
            teacher_buffers = dict(self.teacher.named_buffers())
            for name in self._buffer_names:
                teacher_buffers[name].copy_(student_buffers[name])
        self.step += 1
        return decay

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any):
        """Teacher forward (eval mode, no gradients): the model's own forward with the teacher's weights."""
        self.teacher.train(False)
        return self.teacher(*args, **kwargs)

    @torch.no_grad()
    def checksum(self) -> torch.Tensor:
        """Float64 ``(2,)`` summary (sum, sum of squares) of the teacher's own weights, to compare across processes."""
        weights = self.teacher_weights().values()
        total = sum(w.double().sum() for w in weights)
        squares = sum(w.double().square().sum() for w in weights)
        return torch.stack([torch.as_tensor(total), torch.as_tensor(squares)])

    def check_synchronized(self, accelerator: Any) -> None:
        """Raise if the teacher weights differ between processes (they must: every process averages the same
        student); all processes must call it."""
        if accelerator.num_processes == 1:
            return
        sums = accelerator.gather(self.checksum().to(accelerator.device)[None]).cpu()
        if not bool((sums == sums[0]).all()):
            raise RuntimeError(f"teacher weights differ across processes: {sums.tolist()}")
        logger.info("Teacher weights identical on %d processes (EMA step %d)", accelerator.num_processes, self.step)

    def to(self, *args: Any, **kwargs: Any) -> "MeanTeacher":
        """Move the teacher's own (decoder) weights; the shared frozen parts move with the student."""
        self.teacher.to(*args, **kwargs)
        return self

    # ------------------------------------------------------------------ checkpoints
    def teacher_weights(self) -> dict[str, torch.Tensor]:
        """The teacher's own state: averaged parameters and copied buffers (never the shared frozen backbone)."""
        params = dict(self.teacher.named_parameters())
        buffers = dict(self.teacher.named_buffers())
        state = {n: params[n].detach().clone() for n in self._param_names}
        state.update({n: buffers[n].detach().clone() for n in self._buffer_names})
        return state

    @torch.no_grad()
    def load_teacher_weights(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy teacher weights from a state dict (a full model ``state_dict`` works: other keys are ignored)."""
        params = dict(self.teacher.named_parameters())
        buffers = dict(self.teacher.named_buffers())
        missing = [n for n in self._param_names if n not in state_dict]
        if missing and strict:
            raise KeyError(f"teacher weights are missing {len(missing)} keys, e.g. {missing[:3]}")
        for name in self._param_names + self._buffer_names:
            if name in state_dict:
                target = params[name] if name in params else buffers[name]
                value = state_dict[name]
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(target.shape)}")
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the teacher weights, the EMA step, decay and ramp-up flag."""
        return {
            "teacher": {n: t.cpu() for n, t in self.teacher_weights().items()},
            "step": self.step,
            "decay": self.decay,
            "ramp_up": self.ramp_up,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.load_teacher_weights(state["teacher"])
        self.step = int(state["step"])
        self.decay = float(state.get("decay", self.decay))
        self.ramp_up = bool(state.get("ramp_up", self.ramp_up))
        logger.info("Teacher restored at EMA step %d", self.step)


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` replacement for the teacher: it always stays in eval mode."""
    return nn.Module.train(self, False)
