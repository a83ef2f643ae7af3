"""Gradient-norm recorder: exact global ℓ1/ℓ2 per optimizer step for single-process, DDP, FSDP1,
FSDP2 and DeepSpeed training, as a HF Trainer callback or an accelerate hook.

- ``backends``: where each engine keeps its gradients → this rank's partial sums.
- ``core``: ``GradNormRecorder`` (device buffer, one all-reduce per step, periodic host flush).
- ``callback``: ``GradNormCallback`` for ``transformers.Trainer``.
- ``accelerate_hook``: ``AccelerateGradNormHook`` for custom accelerate loops.
- ``deepspeed``: the DeepSpeed backend and its optimizer-step hook.
"""
