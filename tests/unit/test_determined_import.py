"""`tinv import-determined` on the Determined example's config shapes (written here from its documented keys)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tinv.api import validate_document
from tinv.api.determined import convert_finetune, convert_grid, grid_values

# Key-for-key, value-for-value copies of the Determined example's own configs (see fixtures/determined/README.md).
REAL = Path(__file__).parent / "fixtures" / "determined"

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


def test_generate_grid_shapes_become_grid_axes():
    conv = convert_grid(yaml.safe_load(GENERATE_GRID), job_name="det-logo")
    resource, problems = validate_document(conv.resources[0])
    assert problems == [], problems
    s = resource.spec
    assert s.grid.guidance_scales == [2.0, 4.0, 6.0] and s.grid.seeds == [2, 3] and s.grid.steps == [50]
    assert len(s.prompts) == 4 and s.batch_size == 2
    # Each of the 2 workers renders num_batches x batch_size images per grid point: one tinv cell holds them all.
    assert s.images_per_cell == 2 * 5 * 2 and s.resources.workers == 2
    assert s.embeddings[0].job == "det-logo" and s.embeddings[0].checkpoint == "latest"


def test_cli_writes_valid_resources(tmp_path):
    out = tmp_path / "tinv.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "tinv.api.cli", "import-determined", str(REAL / "finetune_const.yaml"),
         str(REAL / "generate_grid.yaml"), "-o", str(out)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr
    v = subprocess.run([sys.executable, "-m", "tinv.api.cli", "validate", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    assert "TextualInversionJob 'detsd-finetune'" in v.stdout and "GenerationGrid 'detsd-generate'" in v.stdout
    assert "a Van Gogh painting of a det-logo-demo" in out.read_text()


def _real(name: str) -> dict:
    return yaml.safe_load((REAL / name).read_text())


def _validated(conv):
    (doc,) = conv.resources
    resource, problems = validate_document(doc)
    assert problems == [], problems
    return doc, resource.spec


def test_grid_values_follow_determineds_grid_search():
    # master/pkg/searcher/grid.go: evenly spaced, ints rounded half away from zero and clamped to the
    # integers in range, a count of 1 is the midpoint, log is base ** evenly spaced exponents.
    w: list[str] = []
    assert grid_values({"type": "int", "minval": 14748367, "maxval": 214748367, "count": 2}, "s", w) == [14748367, 214748367]
    assert grid_values({"type": "int", "minval": 1, "maxval": 3, "count": 10}, "s", w) == [1, 2, 3]
    assert grid_values({"type": "int", "minval": 1, "maxval": 4, "count": 1}, "s", w) == [3]  # Go rounds 2.5 up
    assert grid_values({"type": "int", "minval": 0, "maxval": 5, "count": 3}, "s", w) == [0, 3, 5]  # 2.5 -> 3
    assert grid_values({"type": "double", "minval": 2, "maxval": 6, "count": 3}, "s", w) == [2.0, 4.0, 6.0]
    assert grid_values({"type": "double", "minval": 2, "maxval": 6, "count": 1}, "s", w) == [4.0]
    assert grid_values({"type": "log", "minval": -4, "maxval": -2, "base": 10, "count": 3}, "s", w) == [10**-4, 10**-3, 10**-2]
    assert grid_values({"type": "categorical", "vals": ["a", "b"]}, "s", w) == ["a", "b"]
    assert grid_values({"type": "const", "val": "5e-4"}, "s", w) == [5e-4]  # YAML 1.2 reads 5e-4 as a number
    assert grid_values([1, 2], "s", w) == [[1, 2]] and w == []
    assert grid_values({"type": "double", "minval": 1, "maxval": 2}, "lr", w) == [1] and "lr" in w[0]


def test_real_generate_grid_keeps_every_prompt_the_demo_file_and_the_480_images():
    conv = convert_grid(_real("generate_grid.yaml"), job_name="detsd-finetune")
    doc, s = _validated(conv)
    assert s.prompts == _real("generate_grid.yaml")["hyperparameters"]["call_kwargs"]["prompt"]["vals"]
    assert len(s.prompts) == 4 and all("det-logo-demo" in p for p in s.prompts)
    assert [e.uri for e in s.embeddings] == ["learned_embeddings_dict_demo.pt"] and s.embeddings[0].job is None
    assert s.grid.guidance_scales == [2.0, 4.0, 6.0] and s.grid.seeds == [14748367, 214748367]
    assert s.grid.steps == [50] and s.grid.schedulers == ["pndm"] and s.precision == "fp16"
    assert s.model.source == "CompVis/stable-diffusion-v1-4" and s.model.token_secret_ref.name == "hf-token"
    assert s.batch_size == 2 and s.images_per_cell == 20 and s.resources.workers == 2 and s.run_policy.backoff_limit == 1
    cells = len(s.prompts) * len(s.grid.guidance_scales) * len(s.grid.seeds) * len(s.grid.steps)
    assert cells == 24 and cells * s.images_per_cell == 480  # the example's 24 trials x 2 workers x 5 x 2
    text = "\n".join(conv.warnings)
    assert "unknown to tinv" not in text and "placeholder" not in text, text
    for key in ("HF_AUTH_TOKEN", "resources.max_slots", "save_freq", "disable_progress_bar", "local_checkpoint_paths"):
        assert key in text, key
    assert "YOUR_HF_AUTH_TOKEN_HERE" not in yaml.safe_dump(doc)


def test_real_finetune_const_maps_every_key():
    conv = convert_finetune(_real("finetune_const.yaml"), images_prefix="s3://tinv-data/")
    _, s = _validated(conv)
    c = s.concepts[0]
    assert (c.token, c.property, c.initializer, c.images) == (
        "det-logo", "object", "brain logo, sharp lines, connected circles, concept art", "s3://tinv-data/det_logos/")
    t = s.training
    assert (t.steps, t.batch_size, t.gradient_accumulation, t.optimizer, t.learning_rate, t.checkpoint_every, t.log_every) == (
        500, 1, 4, "adam", 5e-4, 100, 100)
    assert t.checkpoints_kept == 5 and s.run_policy.backoff_limit == 1 and s.resources.gpus_per_worker == 2
    assert len(t.validation.prompts) == 3 and t.validation.prompts[0].startswith("a watercolor painting on textured paper of a det-logo")
    text = "\n".join(conv.warnings)
    assert "unknown to tinv" not in text, text
    assert "num_pipeline_calls" in text and "HF_AUTH_TOKEN" in text


def test_real_finetune_const_advanced_maps_every_key():
    conv = convert_finetune(_real("finetune_const_advanced.yaml"))
    _, s = _validated(conv)
    t, c = s.training, s.concepts[0]
    assert (t.steps, t.learning_rate, t.scale_lr, t.resolution, t.interpolation, t.flip_p, t.center_crop) == (
        1000, 3.1e-4, True, 512, "bicubic", 0.0, True)
    assert (t.seed, t.norm_reg_weight, t.hidden_reg_weight) == (2147483647, 8.8e-7, 7.8e-7)
    assert (t.noise.beta_start, t.noise.beta_end, t.noise.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (c.caption_from_filename, c.filename_split_char, c.num_blank_prompts, c.num_a_prompts) == (True, "_", 10, 10)
    v = t.validation
    assert (v.scheduler, v.steps, v.guidance_scale, v.seed, len(v.prompts)) == ("pndm", 50, 7.5, 2147483647, 3)
    assert s.resources.gpus_per_worker == 4
    text = "\n".join(conv.warnings)
    assert "unknown to tinv" not in text, text
    # num_train_timesteps 1000 and PNDM's skip_prk_steps are what tinv does anyway: no warning for them.
    assert "num_train_timesteps" not in text and "skip_prk_steps" not in text
    assert "inference_batch_size" in text


def test_changed_values_that_tinv_cannot_honour_are_warned():
    cfg = _real("finetune_const_advanced.yaml")
    cfg["hyperparameters"]["training"]["num_train_timesteps"] = 500
    cfg["hyperparameters"]["inference"]["other_inference_scheduler_kwargs"] = {"skip_prk_steps": False}
    cfg["hyperparameters"]["inference"]["generate_training_images"] = False
    _, s = _validated(conv := convert_finetune(cfg))
    text = "\n".join(conv.warnings)
    assert "num_train_timesteps: 500" in text and "skip_prk_steps" in text
    assert s.training.validation.prompts == [] and "generate_training_images" in text
    grid = _real("generate_grid.yaml")
    grid["hyperparameters"]["pipeline"]["beta_end"] = 0.02
    grid["hyperparameters"]["uuids"] = ["5d3f6c3e-0000-4000-8000-000000000000"]
    conv = convert_grid(grid, job_name=None)
    _, s = _validated(conv)
    text = "\n".join(conv.warnings)
    assert "pipeline.beta_end: 0.02" in text and "5d3f6c3e" in text
    assert s.embeddings[1].uri.endswith("/5d3f6c3e-0000-4000-8000-000000000000/learned_embeddings_dict.pt")
