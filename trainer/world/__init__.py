"""``builtin:shapes``: a small text-to-image model tinv trains itself, on a world it draws itself.

- :mod:`.scenes`: the procedural world (shapes, colours, sizes, positions, backgrounds, styles,
  marks), its template captions and its held-out concepts;
- :mod:`.nets`: the model's components -- diffusers ``AutoencoderKL`` / ``UNet2DConditionModel`` /
  ``DDPMScheduler``, transformers ``CLIPTextModel`` / ``CLIPTokenizer`` -- plus the small image
  tower of the world's CLIP and the evaluator (a classifier of the world's attributes);
- :mod:`.train`: the staged, seeded training (``python -m tinv.trainer.world train OUT``);
- :mod:`.evaluate`: prompt-following and concept-fidelity measurements;
- ``weights/``: the trained model as a diffusers folder, with ``manifest.json``.
"""
