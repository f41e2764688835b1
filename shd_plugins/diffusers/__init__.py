"""diffusers integration: the DiT distillation objective, DiT's losses, models, model folders and sampler.

Add SHD to a diffusers DiT training loop::

    from shd_plugins import SHDConfig
    from shd_plugins.diffusers import DiTDistillationObjective
    objective = DiTDistillationObjective(student, teacher, SHDConfig(weight=1.0, temperature=2.0))
    terms = objective(noisy_latents, timesteps, class_labels, noise=noise, latents=latents)
    terms['loss'].backward()

Modules: ``objective`` (:class:`DiTDistillationObjective`), ``losses`` (DiT's schedule, diffusion loss, learned-sigma
bound, label dropout), ``models`` (loading, DiT's init, teacher/student checks), ``model_folder`` (the trained-model
folder), ``checkpoints`` (crash-safe training checkpoints), ``sampling`` (class-conditional sampling and the
FID-50K protocol).
"""
from __future__ import annotations

from .checkpoints import (
    Checkpoint,
    check_output_dir,
    checkpoint_problem,
    commit_checkpoint,
    find_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_run_id,
    run_contents,
    staging_dir,
    start_run,
)
from .losses import LearnedSigmaVLB, default_dit_scheduler, dit_diffusion_loss, drop_class_labels
from .model_folder import (
    SAMPLE_CONFIG_NAME,
    DiTComponents,
    load_dit_components,
    save_model_folder,
    write_sample_config,
)
from .models import (
    check_student_matches_data,
    check_teacher_compatible,
    disable_builtin_label_dropout,
    initialize_dit_weights,
    learns_sigma,
    load_transformer,
    load_vae,
    read_model_config,
    resolve_transformer_folder,
)
from .objective import DiTDistillationObjective
from .sampling import (
    SCHEDULERS,
    build_scheduler,
    class_labels_for_protocol,
    generate_samples,
    rank_seed,
    sample_class_conditional,
    to_uint8_images,
)

__all__ = [
    'SAMPLE_CONFIG_NAME',
    'SCHEDULERS',
    'Checkpoint',
    'DiTComponents',
    'DiTDistillationObjective',
    'LearnedSigmaVLB',
    'build_scheduler',
    'check_output_dir',
    'check_student_matches_data',
    'check_teacher_compatible',
    'checkpoint_problem',
    'class_labels_for_protocol',
    'commit_checkpoint',
    'default_dit_scheduler',
    'disable_builtin_label_dropout',
    'dit_diffusion_loss',
    'drop_class_labels',
    'find_checkpoint',
    'generate_samples',
    'initialize_dit_weights',
    'learns_sigma',
    'list_checkpoints',
    'load_dit_components',
    'load_transformer',
    'load_vae',
    'prune_checkpoints',
    'rank_seed',
    'read_model_config',
    'read_run_id',
    'run_contents',
    'resolve_transformer_folder',
    'sample_class_conditional',
    'save_model_folder',
    'staging_dir',
    'start_run',
    'to_uint8_images',
    'write_sample_config',
]
