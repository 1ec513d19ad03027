"""tinv.trainer: Textual Inversion training for Stable Diffusion, on a laptop or in a GPU pod.

Modules (one home per concern; the loop is small and formats, storage and reporting sit beside it):

- :mod:`.train`      the training loop, read top to bottom (`train(job, options, *, model=None) -> Result`)
- :mod:`.objective`  the sample stream, the latent cache, the noise schedule and the loss
- :mod:`.optim`      the optimizer (decoupled weight decay) and diffusers' learning-rate schedules
- :mod:`.checkpoint` checkpoint folders: state, manifest, retention, where a run starts, restoring vectors
- :mod:`.tokens`     placeholder ids, boundary-aware prompt tokenisation, the TI embedding layer
- :mod:`.data`       images (any mode, any source), prompts/templates, captions
- :mod:`.models`     model loading (builtin models by name, folders, s3://, pvc://, Hugging Face ids); tokenizer first
- :mod:`.tiny`       the tiny random-weight SD built in code
- :mod:`.formats`    embedding files: diffusers safetensors, AUTOMATIC1111 .pt, Determined dict
- :mod:`.runtime`    the process: ranks, the stop flag, device and dtype, clock, HF token, version, logging
- :mod:`.reporting`  progress.json, TensorBoard, Prometheus, termination message, progress bar
- :mod:`.engine`     the ONE rendering engine (grids, notebook, reproduce, validation images)
- :mod:`.grid`       a grid as a list of images: expansion, sharding, batching (pure, torch-free)
- :mod:`.pngmeta`    the PNG metadata tinv writes and reads back
- :mod:`.generate`   the grid runner (`tinv generate`): batches, writer threads, progress, TensorBoard
- :mod:`.concepts`   resolving embedding references (job + uuid/latest, URIs, paths) to loaded vectors
- :mod:`.gallery`    index.json, contact sheets and the static index.html gallery
- :mod:`.pipeline`   the notebook API (`ConceptPipeline.load(model, concepts=[...])`)
- :mod:`.cli`        the one dispatcher (`python -m tinv.trainer COMMAND`), errors -> exit codes in one place;
                     :mod:`.generate_cli` holds the `generate` and `reproduce` commands
- :mod:`.errors`     exceptions; exit codes are the contract's (:class:`tinv.api.models.ExitCode`)

Importing this package does not import torch; the submodules do.
"""

__version__ = "0.1.0"
