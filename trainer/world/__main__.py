"""``python -m tinv.trainer.world train OUT [--seed S] [--budget-minutes M] [--steps clip=N,...]``,
``... install OUT`` (copy a finished run into the package's weights/ with its manifest) and
``... evaluate MODEL`` (the base model's prompt-following figures)."""

from .cli import main

raise SystemExit(main())
