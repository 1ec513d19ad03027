"""Convert the Determined example's experiment configs into tinv resources.

    tinv import-determined finetune_const.yaml [generate_grid.yaml] [-o out.yaml]

`finetune_const.yaml` (and `finetune_advanced.yaml`) become a TextualInversionJob;
`generate_grid.yaml` becomes a GenerationGrid that uses the job's latest checkpoint.
Hyperparameters may be plain values or Determined search specs (`const`, `categorical`,
`int`/`double` with `count`); grid-search specs become grid axes. Every key that has no
tinv equivalent is reported as a warning, never dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .models import API_VERSION

# Determined key -> (tinv section, tinv field, converter)
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
}
_NOISE = {"beta_start": "betaStart", "beta_end": "betaEnd", "beta_schedule": "betaSchedule"}
_SCHEDULERS = {"ddim": "ddim", "lms-discrete": "lms", "lms": "lms", "pndm": "pndm", "euler": "euler", "dpm": "dpm-solver++"}
# Keys that configure Determined itself or have no effect on results in tinv.
_IGNORED = {
    "use_auth_token", "other_optimizer_kwargs", "save_freq", "latent_cache", "main_process_generator_seed",
    "generator_seed", "num_workers", "mixed_precision_dtype",
}


@dataclass
class Conversion:
    resources: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _values(spec: Any, key: str, warnings: list[str]) -> list[Any]:
    """The values of a hyperparameter: a plain value, or a Determined search spec."""
    if not isinstance(spec, dict) or "type" not in spec:
        return spec if isinstance(spec, list) else [spec]
    kind = spec["type"]
    if kind == "const":
        return [spec["val"]]
    if kind == "categorical":
        return list(spec["vals"])
    if kind in ("int", "double"):
        lo, hi, count = spec["minval"], spec["maxval"], spec.get("count")
        if not count:
            warnings.append(f"{key}: a random {kind} search has no grid equivalent; used its minimum {lo}")
            return [lo]
        if count == 1:
            return [lo]
        step = (hi - lo) / (count - 1)
        vals = [lo + i * step for i in range(count)]
        return [int(round(v)) for v in vals] if kind == "int" else vals
    if kind == "log":
        warnings.append(f"{key}: log-scale searches are not supported; used base^minval")
        return [spec.get("base", 10) ** spec["minval"]]
    warnings.append(f"{key}: unknown search type {kind!r}; ignored")
    return []


def _single(spec: Any, key: str, warnings: list[str]) -> Any:
    vals = _values(spec, key, warnings)
    if len(vals) > 1:
        warnings.append(f"{key}: a search over {vals} in a training config; tinv runs one job per value — used {vals[0]!r}")
    return vals[0] if vals else None


def _flatten(hp: dict[str, Any], prefix: str = "") -> dict[str, tuple[str, Any]]:
    """Hyperparameters flattened to leaf name -> (dotted path, value); search specs are leaves."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in (hp or {}).items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and "type" not in value:
            out.update(_flatten(value, f"{path}."))
        else:
            out[key] = (path, value)
    return out


def _name(text: str, fallback: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", str(text).lower()).strip("-")[:50].strip("-")
    return name or fallback


def _model_source(flat: dict[str, tuple[str, Any]], warnings: list[str]) -> dict[str, Any]:
    source = flat.pop("pretrained_model_name_or_path", (None, "CompVis/stable-diffusion-v1-4"))[1]
    model: dict[str, Any] = {"source": str(source)}
    if "use_auth_token" in flat:
        flat.pop("use_auth_token")
        model["tokenSecretRef"] = {"name": "hf-token", "key": "token"}
        warnings.append("model.use_auth_token: tokens never go into resources; create Secret hf-token (key token) instead")
    if "revision" in flat:
        model["revision"] = str(flat.pop("revision")[1])
    return model


def convert_finetune(config: dict[str, Any], *, images_prefix: str = "s3://CHANGE-ME/") -> Conversion:
    """finetune_const.yaml / finetune_advanced.yaml -> a TextualInversionJob."""
    conv = Conversion()
    w = conv.warnings
    flat = _flatten(config.get("hyperparameters", {}))
    model = _model_source(flat, w)

    def take_list(key: str) -> list[Any]:
        if key not in flat:
            return []
        path, value = flat.pop(key)
        return value if isinstance(value, list) else _values(value, path, w)

    props, tokens, inits, dirs = (take_list(k) for k in ("learnable_properties", "concept_strs", "initializer_strs", "img_dirs"))
    if not tokens:
        w.append("concepts.concept_strs: missing; wrote one placeholder concept 'my-concept'")
        tokens = ["my-concept"]
    if len(inits) == 1 and len(tokens) == 1 and isinstance(inits[0], str):
        pass
    elif len(inits) > len(tokens) and len(tokens) == 1:
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
    w.append(f"concepts.img_dirs: Determined read images from the trial's folder; upload them and check each 'images' URI (now under {images_prefix})")

    training: dict[str, Any] = {}
    noise: dict[str, Any] = {}
    validation: dict[str, Any] = {}
    for key, (path, value) in list(flat.items()):
        if key in _TRAINING:
            training[_TRAINING[key]] = _single(value, path, w)
        elif key in _NOISE:
            noise[_NOISE[key]] = _single(value, path, w)
        elif key == "append_file_name_to_text":
            for c in concepts:
                c["captionFromFilename"] = bool(_single(value, path, w))
        elif key == "file_name_split_char":
            for c in concepts:
                c["filenameSplitChar"] = str(_single(value, path, w))
        elif key in ("num_blank_prompts", "num_a_prompts"):
            camel = {"num_blank_prompts": "numBlankPrompts", "num_a_prompts": "numAPrompts"}[key]
            for c in concepts:
                c[camel] = int(_single(value, path, w))
        elif key in ("inference_prompts", "prompts"):
            validation["prompts"] = [str(p) for p in (value if isinstance(value, list) else [value])]
        elif key == "inference_scheduler_name":
            name = str(_single(value, path, w))
            validation["scheduler"] = _SCHEDULERS.get(name, "ddim")
            if name not in _SCHEDULERS:
                w.append(f"{path}: unknown scheduler {name!r}; used ddim")
        elif key == "num_inference_steps":
            validation["steps"] = int(_single(value, path, w))
        elif key == "guidance_scale":
            validation["guidanceScale"] = float(_single(value, path, w))
        elif key == "inference_freq":
            validation["every"] = int(_single(value, path, w))
        elif key in _IGNORED:
            w.append(f"{path}: has no tinv equivalent; ignored")
        else:
            w.append(f"{path}: unknown to tinv; ignored")
    if noise:
        training["noise"] = noise
    if validation:
        training["validation"] = validation
    if isinstance(training.get("optimizer"), str):
        training["optimizer"] = training["optimizer"].lower()

    slots = (config.get("resources") or {}).get("slots_per_trial", 1)
    resources = {"gpusPerWorker": int(slots)} if slots else {}
    if slots and int(slots) > 8:
        resources = {"gpusPerWorker": 8, "workers": -(-int(slots) // 8)}
    name = _name(config.get("name") or tokens[0], "imported-job")
    conv.resources.append(
        {
            "apiVersion": API_VERSION,
            "kind": "TextualInversionJob",
            "metadata": {"name": name},
            "spec": {"model": model, "concepts": concepts, "training": training, "resources": resources},
        }
    )
    return conv


def convert_grid(config: dict[str, Any], *, job_name: str | None) -> Conversion:
    """generate_grid.yaml -> a GenerationGrid using the job's latest checkpoint (or the embeddings file it names)."""
    conv = Conversion()
    w = conv.warnings
    flat = _flatten(config.get("hyperparameters", {}))
    model = _model_source(flat, w)
    spec: dict[str, Any] = {"model": model}
    grid: dict[str, Any] = {}
    prompts: list[str] = []
    batch_size, num_batches = 1, 1
    embeddings: list[dict[str, Any]] = []
    for key, (path, value) in list(flat.items()):
        if key in ("prompts", "inference_prompts"):
            prompts = [str(p) for p in (value if isinstance(value, list) else _values(value, path, w))]
        elif key == "guidance_scale":
            grid["guidanceScales"] = [float(v) for v in _values(value, path, w)]
        elif key in ("seed", "seeds", "main_process_generator_seed", "generator_seed"):
            grid["seeds"] = [int(v) for v in _values(value, path, w)]
        elif key == "num_inference_steps":
            grid["steps"] = [int(v) for v in _values(value, path, w)]
        elif key in ("scheduler_name", "inference_scheduler_name"):
            grid["schedulers"] = [_SCHEDULERS.get(str(v), "ddim") for v in _values(value, path, w)]
        elif key == "batch_size":
            batch_size = int(_single(value, path, w))
        elif key == "num_batches":
            num_batches = int(_single(value, path, w))
        elif key in ("uuids", "checkpoint_uuids", "uuid"):
            vals = value if isinstance(value, list) else [value]
            for v in vals:
                embeddings.append({"job": job_name, "checkpoint": str(v)} if job_name else {"uri": f"s3://CHANGE-ME/checkpoints/{v}/"})
            w.append(f"{path}: Determined checkpoint uuids are not tinv checkpoint uuids; check each embedding reference")
        elif key in ("learned_embeddings_filename", "learned_embeddings_path", "embeddings_path"):
            embeddings.append({"uri": str(_single(value, path, w))})
        elif key == "negative_prompt":
            spec["negativePrompt"] = str(_single(value, path, w))
        elif key in ("height", "width", "img_size"):
            size = int(_single(value, path, w))
            grid.setdefault("sizes", [{"width": size, "height": size}])
        elif key in ("mixed_precision", "fp16", "use_fp16"):
            spec["precision"] = "fp16" if _single(value, path, w) else "fp32"
        elif key in _IGNORED:
            w.append(f"{path}: has no tinv equivalent; ignored")
        else:
            w.append(f"{path}: unknown to tinv; ignored")
    if not embeddings and job_name:
        embeddings.append({"job": job_name, "checkpoint": "latest"})
    if not embeddings:
        w.append("no embeddings: pass the finetune config too, or add spec.embeddings by hand")
    if not prompts:
        w.append("no prompts found; wrote a placeholder prompt")
        prompts = ["a photo of my concept"]
    spec.update({"embeddings": embeddings, "prompts": prompts, "grid": grid, "imagesPerCell": batch_size * num_batches, "batchSize": batch_size})
    slots = (config.get("resources") or {}).get("slots_per_trial", 1)
    if slots and int(slots) > 1:
        spec["resources"] = {"workers": int(slots), "gpusPerWorker": 1}
    conv.resources.append(
        {"apiVersion": API_VERSION, "kind": "GenerationGrid", "metadata": {"name": _name(config.get("name") or "grid", "imported-grid")}, "spec": spec}
    )
    return conv
