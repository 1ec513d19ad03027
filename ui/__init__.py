"""tinv.ui: a read-only web UI for TextualInversionJobs and GenerationGrids.

`tinv ui` serves it on 127.0.0.1 for local runs (the run folders `tinv run` writes, plus any
resource YAML files named on the command line); `tinv ui --kube` shows one namespace of a cluster
through the Kubernetes API and the runs' storage. The UI changes nothing: it reads resources,
their Jobs, pods, pod logs and Events, and the storage layout of tinv.api.storage.

Modules: `sources` (the two sources behind one interface), `storage_view` (what a run's storage
holds: progress, checkpoints, TensorBoard scalars and images, grid index and shards), `views`
(pure builders of what the pages show), `app` (the Starlette app and its routes), `cli`.
Nothing here is imported by tinv.api at import time; `tinv ui` imports it when asked for.
"""
