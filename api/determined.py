"""Convert the Determined example's experiment configs into tinv resources.

    tinv import-determined finetune_const.yaml [generate_grid.yaml] [-o out.yaml]

`finetune_const.yaml` (and `finetune_const_advanced.yaml`) become a TextualInversionJob;
`generate_grid.yaml` becomes a GenerationGrid. Hyperparameters may sit at any depth (Determined's
nested hyperparameters) and take every Determined shape: a plain value, `const`, `categorical`,
`int` / `double` / `log` with `count`. A grid search's values are computed exactly as Determined's
master computes them (master/pkg/searcher/grid.go), so the imported grid renders the same prompts,
guidance scales and seeds. Every key that has no tinv equivalent is reported as a warning, never
dropped silently; keys whose Determined value is what tinv does anyway are mapped without one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .models import API_VERSION

# Leaf hyperparameter name -> Training field (finetune configs).
_TRAINING = {
    "num_sgd_steps": "steps",
    "train_batch_size": "batchSize",
    "gradient_accumulation_steps": "gradientAccumulation",
    "optimizer_name": "optimizer",
    "learning_rate": "learningRate",
    "scale_lr": "scaleLr",
    "checkpoint_freq": "checkpointEvery",
    "metric_report_freq": "logEvery",
    "img_size": "resolution",
    "interpolation": "interpolation",
    "flip_p": "flipP",
    "center_crop": "centerCrop",
    "norm_reg_weight": "normRegWeight",
    "hidden_reg_weight": "hiddenRegWeight",
    "seed": "seed",
    "train_seed": "seed",
}
_NOISE = {"beta_start": "betaStart", "beta_end": "betaEnd", "beta_schedule": "betaSchedule"}
_CONCEPT_FLAGS = {
    "append_file_name_to_text": ("captionFromFilename", bool),
    "file_name_split_char": ("filenameSplitChar", str),
    "num_blank_prompts": ("numBlankPrompts", int),
    "num_a_prompts": ("numAPrompts", int),
}
_SCHEDULERS = {"ddim": "ddim", "lms-discrete": "lms", "lms": "lms", "pndm": "pndm", "euler": "euler", "dpm": "dpm-solver++"}
# What tinv's samplers already do (trainer/models.py builds PNDM with skip_prk_steps=True), so these
# extra scheduler kwargs change nothing.
_SCHEDULER_KWARGS_BUILT_IN = {"pndm": {"skip_prk_steps": True}}
# Stable Diffusion 1.x's own training noise schedule: the model's scheduler config, which tinv uses.
_SD1_NOISE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
# Keys that configure Determined itself or have no effect on results in tinv.
_NO_EQUIVALENT = {
    "use_auth_token": "tokens never go into resources",
    "other_optimizer_kwargs": "tinv's optimizers take no extra kwargs",
    "save_freq": "grid workers write each image as it is rendered",
    "latent_cache": "tinv always caches latents",
    "num_workers": "data loading is in-process",
    "mixed_precision_dtype": "set training.mixedPrecision",
    "disable_progress_bar": "progress goes to progress.json and the log",
    "num_pipeline_calls": "validation renders one image per prompt at each validation step",
    "inference_batch_size": "validation renders one image per prompt at each validation step",
}


@dataclass
class Conversion:
    resources: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# YAML 1.2 (Determined's parser) reads `5e-4` as a number; PyYAML (YAML 1.1) reads it as a string.
_YAML12_EXPONENT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def _yaml12(value: Any) -> Any:
    """A scalar as Determined reads it: exponent-form strings such as '5e-4' are floats."""
    return float(value) if isinstance(value, str) and _YAML12_EXPONENT.fullmatch(value) else value


def _go_round(x: float) -> int:
    """Go's math.Round (half away from zero), which Determined's master uses; Python's round() is half-to-even."""
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def _is_search_spec(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("type"), str)


def grid_values(spec: Any, path: str, warnings: list[str]) -> list[Any]:
    """The values a grid search gives one hyperparameter, as Determined's master computes them.

    A plain value (a list included: Determined passes lists through unchanged) is one value.
    `int` counts are clamped to the integers in range; a count of 1 is the midpoint.
    """
    if not _is_search_spec(spec):
        return [_yaml12(spec)]
    kind = spec["type"]
    if kind == "const":
        return [_yaml12(spec["val"])]
    if kind == "categorical":
        return [_yaml12(v) for v in spec["vals"]]
    if kind in ("int", "double", "log"):
        lo, hi, count = _yaml12(spec["minval"]), _yaml12(spec["maxval"]), spec.get("count")
        if not count:
            warnings.append(f"{path}: a random {kind} search has no grid equivalent (give it a count); used its minimum {lo}")
            count = 1
            hi = lo
        if kind == "int":
            count = min(int(count), int(hi) - int(lo) + 1)
            if count == 1:
                return [_go_round((lo + hi) / 2)]
            return [_go_round(lo + i * (hi - lo) / (count - 1)) for i in range(count)]
        points = [(lo + hi) / 2] if count == 1 else [lo + i * (hi - lo) / (count - 1) for i in range(int(count))]
        if kind == "log":
            base = spec.get("base", 10)
            return [base**p for p in points]
        return points
    warnings.append(f"{path}: unknown hyperparameter type {kind!r}; ignored")
    return []


def _single(spec: Any, path: str, warnings: list[str]) -> Any:
    """One value for a config that runs once (Determined's `single` searcher)."""
    vals = grid_values(spec, path, warnings)
    if len(vals) > 1:
        warnings.append(f"{path}: a search over {vals}; a tinv job trains once — used {vals[0]!r} (one job per value for a sweep)")
    return vals[0] if vals else None


def _as_list(spec: Any, path: str, warnings: list[str]) -> list[Any]:
    """A list-valued setting: a YAML list, or the values of a search spec."""
    if isinstance(spec, list):
        return spec
    return grid_values(spec, path, warnings)


def _leaves(hp: dict[str, Any] | None, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """Nested hyperparameters flattened to leaf name -> (dotted path, value).

    A dict is a nested group unless it is a search spec, or a free-form kwargs dict
    (`other_scheduler_kwargs`, `other_inference_scheduler_kwargs`), which is one value.
    """
    out: dict[str, tuple[str, Any]] = {}
    for key, value in (hp or {}).items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_search_spec(value) and not (key.startswith("other_") and key.endswith("_kwargs")):
            out.update(_leaves(value, f"{path}."))
        else:
            out[key] = (path, value)
    return out


def _name(text: str, fallback: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", str(text).lower()).strip("-")[:50].strip("-")
    return name or fallback


def _model_source(flat: dict[str, tuple[str, Any]], config: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    source = flat.pop("pretrained_model_name_or_path", (None, "CompVis/stable-diffusion-v1-4"))[1]
    model: dict[str, Any] = {"source": str(source)}
    if "use_auth_token" in flat:
        flat.pop("use_auth_token")
        model["tokenSecretRef"] = {"name": "hf-token", "key": "token"}
        warnings.append("use_auth_token: tokens never go into resources; create Secret hf-token (key token) instead")
    env = ((config.get("environment") or {}).get("environment_variables")) or []
    for entry in env if isinstance(env, list) else []:
        var = str(entry).split("=", 1)[0]
        if var in ("HF_AUTH_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            model["tokenSecretRef"] = {"name": "hf-token", "key": "token"}
            warnings.append(f"environment.environment_variables: {var} is not copied (tokens never go into resources); "
                            "create Secret hf-token (key token): model.tokenSecretRef points at it")
        else:
            warnings.append(f"environment.environment_variables: {var} has no tinv equivalent; ignored")
    if "revision" in flat:
        model["revision"] = str(flat.pop("revision")[1])
    return model


def _run_policy(config: dict[str, Any]) -> dict[str, Any]:
    restarts = config.get("max_restarts")
    return {"backoffLimit": int(restarts)} if isinstance(restarts, int) and 0 <= restarts <= 100 else {}


def _resource_warnings(config: dict[str, Any], warnings: list[str]) -> None:
    for key in (config.get("resources") or {}):
        if key != "slots_per_trial":
            warnings.append(f"resources.{key}: no tinv equivalent (spec.resources sets GPUs, workers and placement); ignored")


def _check_searcher(config: dict[str, Any], expected: str, warnings: list[str]) -> None:
    name = (config.get("searcher") or {}).get("name")
    if name and name != expected:
        warnings.append(f"searcher.name: {name!r}; tinv maps a {expected!r} search (a {name} search over training runs is one job per point)")


def _noise_matches_sd1(key: str, value: Any) -> bool:
    want = _SD1_NOISE[key]
    return value == want if isinstance(want, str) else isinstance(value, (int, float)) and abs(float(value) - want) <= 1e-12 + 1e-9 * want


def _scheduler(value: Any, path: str, warnings: list[str]) -> str:
    name = str(value)
    if name not in _SCHEDULERS:
        warnings.append(f"{path}: unknown scheduler {name!r}; used ddim")
    return _SCHEDULERS.get(name, "ddim")


def _scheduler_kwargs(value: Any, schedulers: list[str], path: str, warnings: list[str]) -> None:
    """Extra sampler kwargs: fine when tinv's sampler already does exactly that, warned otherwise."""
    if not value:
        return
    built_in = [_SCHEDULER_KWARGS_BUILT_IN.get(s, {}) for s in schedulers] or [{}]
    if not all(all(b.get(k) == v for k, v in dict(value).items()) for b in built_in):
        warnings.append(f"{path}: {value} has no tinv equivalent (tinv's samplers use their standard settings); ignored")


def convert_finetune(config: dict[str, Any], *, images_prefix: str = "s3://CHANGE-ME/") -> Conversion:
    """finetune_const.yaml / finetune_const_advanced.yaml -> a TextualInversionJob."""
    conv = Conversion()
    w = conv.warnings
    _check_searcher(config, "single", w)
    _resource_warnings(config, w)
    flat = _leaves(config.get("hyperparameters"))
    model = _model_source(flat, config, w)

    def take_list(key: str) -> list[Any]:
        if key not in flat:
            return []
        path, value = flat.pop(key)
        return _as_list(value, path, w)

    props, tokens, inits, dirs = (take_list(k) for k in ("learnable_properties", "concept_strs", "initializer_strs", "img_dirs"))
    if not tokens:
        w.append("concepts.concept_strs: missing; wrote one placeholder concept 'my-concept'")
        tokens = ["my-concept"]
    if len(inits) > len(tokens) == 1:
        # YAML `[brain logo, sharp lines, ...]` splits one phrase on commas: join it back.
        inits = [", ".join(map(str, inits))]
    concepts = []
    for i, token in enumerate(tokens):
        img_dir = str(dirs[i]) if i < len(dirs) else f"concept-{i}"
        concepts.append(
            {
                "token": str(token),
                "property": str(props[i]) if i < len(props) else "object",
                "initializer": str(inits[i]) if i < len(inits) else str(token),
                "images": images_prefix.rstrip("/") + "/" + img_dir.strip("/") + "/",
            }
        )
    w.append(f"concepts.img_dirs: Determined read images from the experiment's folder; upload them and check each 'images' URI (now under {images_prefix})")

    training: dict[str, Any] = {}
    noise: dict[str, Any] = {}
    validation: dict[str, Any] = {}
    scheduler_kwargs: tuple[str, Any] | None = None
    render_validation = True
    for key, (path, value) in list(flat.items()):
        if key in _TRAINING:
            training[_TRAINING[key]] = _single(value, path, w)
        elif key in _NOISE:
            noise[_NOISE[key]] = _single(value, path, w)
        elif key == "num_train_timesteps":
            steps = _single(value, path, w)
            if not _noise_matches_sd1(key, steps):
                w.append(f"{path}: {steps}; tinv uses the model's own num_train_timesteps (1000 for SD 1.x); ignored")
        elif key in _CONCEPT_FLAGS:
            camel, cast = _CONCEPT_FLAGS[key]
            for c in concepts:
                c[camel] = cast(_single(value, path, w))
        elif key in ("inference_prompts", "prompts"):
            validation["prompts"] = [str(p) for p in _as_list(value, path, w)]
        elif key == "inference_scheduler_name":
            validation["scheduler"] = _scheduler(_single(value, path, w), path, w)
        elif key == "other_inference_scheduler_kwargs":
            scheduler_kwargs = (path, value)
        elif key == "num_inference_steps":
            validation["steps"] = int(_single(value, path, w))
        elif key == "guidance_scale":
            validation["guidanceScale"] = float(_single(value, path, w))
        elif key in ("main_process_generator_seed", "generator_seed"):
            validation["seed"] = int(_single(value, path, w))
        elif key == "inference_freq":
            validation["every"] = int(_single(value, path, w))
        elif key == "generate_training_images":
            render_validation = bool(_single(value, path, w))
        elif key in _NO_EQUIVALENT:
            w.append(f"{path}: no tinv equivalent ({_NO_EQUIVALENT[key]}); ignored")
        else:
            w.append(f"{path}: unknown to tinv; ignored")
    if scheduler_kwargs:
        _scheduler_kwargs(scheduler_kwargs[1], [validation.get("scheduler", "ddim")], scheduler_kwargs[0], w)
    if not render_validation and validation.pop("prompts", None):
        w.append("generate_training_images: false; the inference prompts were left out (no validation images)")
    if noise:
        training["noise"] = noise
    if validation:
        training["validation"] = validation
    if isinstance(training.get("optimizer"), str):
        training["optimizer"] = training["optimizer"].lower()
    kept = (config.get("checkpoint_storage") or {}).get("save_trial_latest")
    if isinstance(kept, int) and kept >= 1:
        training["checkpointsKept"] = kept

    slots = int((config.get("resources") or {}).get("slots_per_trial", 1) or 1)
    resources = {"gpusPerWorker": slots} if slots <= 8 else {"gpusPerWorker": 8, "workers": -(-slots // 8)}
    spec: dict[str, Any] = {"model": model, "concepts": concepts, "training": training, "resources": resources}
    if policy := _run_policy(config):
        spec["runPolicy"] = policy
    name = _name(config.get("name") or tokens[0], "imported-job")
    conv.resources.append({"apiVersion": API_VERSION, "kind": "TextualInversionJob", "metadata": {"name": name}, "spec": spec})
    return conv


def convert_grid(config: dict[str, Any], *, job_name: str | None) -> Conversion:
    """generate_grid.yaml -> a GenerationGrid that renders the same images.

    In Determined each grid point is a trial whose `slots_per_trial` workers each call the pipeline
    `num_batches` times with `batch_size` images from a generator seeded `main_process_generator_seed
    + rank`. tinv renders a cell's images with seeds `seed + k`, so one cell holds
    workers x num_batches x batch_size images and the grid has exactly as many images as the
    experiment; its workers shard the grid instead of repeating it.
    """
    conv = Conversion()
    w = conv.warnings
    _check_searcher(config, "grid", w)
    _resource_warnings(config, w)
    flat = _leaves(config.get("hyperparameters"))
    model = _model_source(flat, config, w)
    spec: dict[str, Any] = {"model": model}
    grid: dict[str, Any] = {}
    prompts: list[str] = []
    batch_size, num_batches = 1, 1
    uuids: list[str] = []
    local_files: list[str] = []
    filename = "learned_embeddings_dict.pt"
    scheduler_kwargs: tuple[str, Any] | None = None
    for key, (path, value) in list(flat.items()):
        if key in ("prompt", "prompts", "inference_prompts"):
            prompts = [str(p) for p in _as_list(value, path, w)]
        elif key == "negative_prompt":
            spec["negativePrompt"] = str(_single(value, path, w))
        elif key == "guidance_scale":
            grid["guidanceScales"] = [float(v) for v in grid_values(value, path, w)]
        elif key in ("main_process_generator_seed", "generator_seed", "seed", "seeds"):
            grid["seeds"] = [int(v) for v in _as_list(value, path, w)]
        elif key == "num_inference_steps":
            grid["steps"] = [int(v) for v in grid_values(value, path, w)]
        elif key in ("scheduler_name", "inference_scheduler_name"):
            grid["schedulers"] = [_scheduler(v, path, w) for v in grid_values(value, path, w)]
        elif key in ("other_scheduler_kwargs", "other_inference_scheduler_kwargs"):
            scheduler_kwargs = (path, value)
        elif key in _NOISE or key == "num_train_timesteps":
            value = _single(value, path, w)
            if not _noise_matches_sd1(key, value):
                w.append(f"{path}: {value}; tinv samples with the model's own noise schedule; ignored")
        elif key == "batch_size":
            batch_size = int(_single(value, path, w))
        elif key == "num_batches":
            num_batches = int(_single(value, path, w))
        elif key in ("uuids", "checkpoint_uuids", "uuid"):
            uuids += [str(v) for v in _as_list(value, path, w)]
        elif key == "local_checkpoint_paths":
            local_files += [str(v) for v in _as_list(value, path, w)]
        elif key == "learned_embeddings_filename":
            filename = str(_single(value, path, w))
        elif key in ("height", "width", "img_size"):
            size = int(_single(value, path, w))
            grid.setdefault("sizes", [{"width": size, "height": size}])
        elif key in ("mixed_precision", "fp16", "use_fp16"):
            spec["precision"] = "fp16" if _single(value, path, w) else "fp32"
        elif key in _NO_EQUIVALENT:
            w.append(f"{path}: no tinv equivalent ({_NO_EQUIVALENT[key]}); ignored")
        else:
            w.append(f"{path}: unknown to tinv; ignored")
    if scheduler_kwargs:
        _scheduler_kwargs(scheduler_kwargs[1], grid.get("schedulers", ["ddim"]), scheduler_kwargs[0], w)

    embeddings: list[dict[str, Any]] = [{"uri": path} for path in local_files]
    if local_files:
        w.append(f"local_checkpoint_paths: {local_files} are read relative to where `tinv run` starts; "
                 "upload them (s3:// or pvc://) for a cluster run")
    for uuid in uuids:
        embeddings.append({"uri": f"s3://CHANGE-ME/{uuid}/{filename}"})
        w.append(f"uuids: {uuid} is a Determined checkpoint; copy its {filename} to storage and fix the uri "
                 "(tinv checkpoints are referenced as {job, checkpoint})")
    if not embeddings and job_name:
        embeddings.append({"job": job_name, "checkpoint": "latest"})
    if not embeddings:
        w.append("no embeddings: give local_checkpoint_paths or uuids, or pass the finetune config too")
    if not prompts:
        w.append("no prompt found (call_kwargs.prompt); wrote a placeholder prompt — edit spec.prompts")
        prompts = ["a photo of my concept"]

    workers = int((config.get("resources") or {}).get("slots_per_trial", 1) or 1)
    spec.update({"embeddings": embeddings, "prompts": prompts, "grid": grid,
                 "imagesPerCell": workers * num_batches * batch_size, "batchSize": batch_size})
    if workers > 1:
        spec["resources"] = {"workers": workers, "gpusPerWorker": 1}
    if policy := _run_policy(config):
        spec["runPolicy"] = policy
    conv.resources.append(
        {"apiVersion": API_VERSION, "kind": "GenerationGrid", "metadata": {"name": _name(config.get("name") or "grid", "imported-grid")}, "spec": spec}
    )
    return conv
