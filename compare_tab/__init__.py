"""Generate, Compare and User-study tabs: UI over hypersd_core.models.sampling / study."""

from .compare import build_compare_tab
from .generate import build_generate_tab
from .study import build_study_tab

__all__ = ["build_compare_tab", "build_generate_tab", "build_study_tab"]
