"""``python -m llm_refine.pipeline RECIPE ...`` = ``llm-refine pipeline RECIPE ...``."""
import sys

from .cli import main

sys.exit(main())
