"""tinv.trainer: Textual Inversion training for Stable Diffusion, on a laptop or in a GPU pod.

Modules (the loop is small; formats, storage and reporting sit beside it, not inside it):

- :mod:`.train`      the training loop (`train(job, Options) -> Result`)
- :mod:`.tokens`     placeholder ids, boundary-aware prompt tokenisation, the TI embedding layer
- :mod:`.data`       images (any mode, any source), prompts/templates, captions
- :mod:`.models`     model loading (builtin:tiny, folders, s3://, pvc://, Hugging Face ids)
- :mod:`.tiny`       the tiny random-weight SD built in code
- :mod:`.formats`    embedding files: diffusers safetensors, AUTOMATIC1111 .pt, Determined dict
- :mod:`.checkpoint` checkpoint folders, manifests, retention, resume sources
- :mod:`.reporting`  progress.json, TensorBoard, Prometheus, termination message, progress bar
- :mod:`.cli`        the trainer's commands (`tinv train`, `tinv generate`, `tinv reproduce`, helpers); `python -m tinv.trainer`
- :mod:`.generate`   the generation engine and grid runner (expansion, sharding, batching, resume)
- :mod:`.concepts`   resolving embedding references (job + uuid/latest, URIs, paths) to loaded vectors
- :mod:`.gallery`    index.json, contact sheets and the static index.html gallery
- :mod:`.pipeline`   the notebook API (`ConceptPipeline.load(model, concepts=[...])`)
- :mod:`.generate_cli` the `generate` and `reproduce` commands
- :mod:`.errors`     exceptions and exit codes (0 ok, 1 internal, 2 invalid, 69 unavailable,
                     75 pre-empted after a checkpoint, 130 Ctrl-C)

Importing this package does not import torch; the submodules do.
"""

__version__ = "0.1.0"
