"""`tinv import-determined` on the Determined example's config shapes (written here from its documented keys)."""

from __future__ import annotations

import subprocess
import sys

import yaml

from tinv.api import validate_document
from tinv.api.determined import convert_finetune, convert_grid

FINETUNE_CONST = """
name: textual-inversion-const
entrypoint: finetune:TextualInversionTrainer
hyperparameters:
  model:
    pretrained_model_name_or_path: CompVis/stable-diffusion-v1-4
    use_auth_token: YOUR_HF_AUTH_TOKEN_HERE
  concepts:
    learnable_properties:
      - object
    concept_strs:
      - det-logo
    initializer_strs:
      - brain logo, sharp lines, connected circles, concept art
    img_dirs:
      - det_logos
  training:
    num_sgd_steps: 500
    train_batch_size: 1
    gradient_accumulation_steps: 4
    optimizer_name: adam
    learning_rate: 5e-04
    other_optimizer_kwargs: {}
    scale_lr: true
    checkpoint_freq: 100
    metric_report_freq: 100
resources:
  slots_per_trial: 2
"""

ADVANCED_EXTRA = """
  data:
    img_size: 512
    interpolation: bicubic
    flip_p: 0.5
    center_crop: false
    append_file_name_to_text: true
    file_name_split_char: "_"
    num_blank_prompts: 25
    num_a_prompts: 25
  noise:
    beta_start: 0.00085
    beta_end: 0.012
    beta_schedule: scaled_linear
  regularisation:
    norm_reg_weight: 0.001
    hidden_reg_weight: 0.0
  inference:
    inference_prompts:
      - a watercolor painting of a det-logo
    inference_scheduler_name: lms-discrete
    num_inference_steps: 50
    guidance_scale: 7.5
    some_unknown_knob: 3
"""

GENERATE_GRID = """
name: generate-grid
hyperparameters:
  pretrained_model_name_or_path: CompVis/stable-diffusion-v1-4
  batch_size: 2
  num_batches: 5
  main_process_generator_seed:
    type: categorical
    vals: [2, 3]
  guidance_scale:
    type: int
    minval: 2
    maxval: 6
    count: 3
  num_inference_steps: 50
  prompts:
    - a watercolor painting of a det-logo
    - a Van Gogh painting of a det-logo
    - a neon det-logo
    - a det-logo in marble
resources:
  slots_per_trial: 2
"""


def test_finetune_const_maps_every_documented_key():
    conv = convert_finetune(yaml.safe_load(FINETUNE_CONST), images_prefix="s3://data/")
    (job,) = conv.resources
    resource, problems = validate_document(job)
    assert problems == [], problems
    spec = resource.spec
    c = spec.concepts[0]
    assert (c.token, c.property, c.initializer, c.images) == (
        "det-logo", "object", "brain logo, sharp lines, connected circles, concept art", "s3://data/det_logos/")
    t = spec.training
    assert (t.steps, t.batch_size, t.gradient_accumulation, t.optimizer, t.learning_rate, t.scale_lr, t.checkpoint_every, t.log_every) == (
        500, 1, 4, "adam", 5e-4, True, 100, 100)
    assert spec.resources.gpus_per_worker == 2
    assert spec.model.source == "CompVis/stable-diffusion-v1-4" and spec.model.token_secret_ref.name == "hf-token"
    assert any("use_auth_token" in w for w in conv.warnings)  # the token is never copied
    assert "YOUR_HF_AUTH_TOKEN_HERE" not in yaml.safe_dump(job)


def test_advanced_keys_and_unknown_ones_are_warned():
    cfg = yaml.safe_load(FINETUNE_CONST.replace("resources:", ADVANCED_EXTRA + "resources:", 1))
    conv = convert_finetune(cfg)
    resource, problems = validate_document(conv.resources[0])
    assert problems == [], problems
    t = resource.spec.training
    assert (t.resolution, t.interpolation, t.flip_p, t.norm_reg_weight) == (512, "bicubic", 0.5, 0.001)
    assert (t.noise.beta_start, t.noise.beta_end, t.noise.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert t.validation.scheduler == "lms" and t.validation.prompts == ["a watercolor painting of a det-logo"]
    c = resource.spec.concepts[0]
    assert c.caption_from_filename and c.num_blank_prompts == 25 and c.num_a_prompts == 25
    assert any("some_unknown_knob" in w for w in conv.warnings)


def test_generate_grid_becomes_a_grid_with_the_same_480_images():
    conv = convert_grid(yaml.safe_load(GENERATE_GRID), job_name="det-logo")
    resource, problems = validate_document(conv.resources[0])
    assert problems == [], problems
    s = resource.spec
    assert s.grid.guidance_scales == [2.0, 4.0, 6.0] and s.grid.seeds == [2, 3] and s.grid.steps == [50]
    assert len(s.prompts) == 4 and s.images_per_cell == 10 and s.batch_size == 2
    assert s.resources.workers == 2
    assert s.embeddings[0].job == "det-logo" and s.embeddings[0].checkpoint == "latest"
    cells = len(s.prompts) * len(s.grid.guidance_scales) * len(s.grid.seeds)
    assert cells == 24 and cells * s.images_per_cell * s.resources.workers == 480  # the seed's 480 images


def test_cli_writes_valid_resources(tmp_path):
    (tmp_path / "finetune_const.yaml").write_text(FINETUNE_CONST)
    (tmp_path / "generate_grid.yaml").write_text(GENERATE_GRID)
    out = tmp_path / "tinv.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "tinv.api.cli", "import-determined", str(tmp_path / "finetune_const.yaml"),
         str(tmp_path / "generate_grid.yaml"), "-o", str(out)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr
    v = subprocess.run([sys.executable, "-m", "tinv.api.cli", "validate", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    assert "TextualInversionJob 'textual-inversion-const'" in v.stdout and "GenerationGrid 'generate-grid'" in v.stdout
