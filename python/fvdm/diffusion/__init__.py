"""Diffusion for FVDM: schedules, objectives, PTSS, the loss, schedule-matrix samplers and the
zero-shot tasks as schedule matrices."""

from fvdm.diffusion.guidance import classifier_free_guidance
from fvdm.diffusion.losses import LossOutput, diffusion_loss
from fvdm.diffusion._common import frame_noise
from fvdm.diffusion.objectives import (
    OBJECTIVES,
    min_snr_weights,
    predict_x0_eps,
    prediction_coeffs,
    target_coeffs,
    training_target,
)
from fvdm.diffusion.ptss import PTSS_MODES, ptss_coins, sample_timesteps
from fvdm.diffusion.samplers import (
    CONDITIONING,
    METHODS,
    StepWeights,
    ddim_step,
    ddpm_log_variance_bounds,
    ddpm_step,
    euler_step,
    fold_weights,
    sample,
)
from fvdm.diffusion.schedules import (
    DDPMSchedule,
    FlowSchedule,
    Schedule,
    cosine_betas,
    ddpm_schedule,
    linear_betas,
    make_schedule,
)
from fvdm.diffusion.tasks import (
    ddpm_ladder,
    extension,
    flow_ladder,
    image_to_video,
    interpolation,
    keyframes,
    task_matrix,
    ladder_for,
    long_video,
    rolling_diagonal,
    unconditional,
    window_sampler,
)

__all__ = [
    "frame_noise",
    "min_snr_weights",
    "classifier_free_guidance",
    "LossOutput",
    "diffusion_loss",
    "OBJECTIVES",
    "predict_x0_eps",
    "prediction_coeffs",
    "target_coeffs",
    "training_target",
    "PTSS_MODES",
    "ptss_coins",
    "sample_timesteps",
    "CONDITIONING",
    "METHODS",
    "StepWeights",
    "ddim_step",
    "ddpm_log_variance_bounds",
    "ddpm_step",
    "euler_step",
    "fold_weights",
    "sample",
    "DDPMSchedule",
    "FlowSchedule",
    "Schedule",
    "cosine_betas",
    "ddpm_schedule",
    "linear_betas",
    "make_schedule",
    "ddpm_ladder",
    "extension",
    "flow_ladder",
    "image_to_video",
    "interpolation",
    "keyframes",
    "task_matrix",
    "ladder_for",
    "long_video",
    "rolling_diagonal",
    "unconditional",
    "window_sampler",
]
