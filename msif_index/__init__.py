"""msif-index: multi-stage influence (Chen et al., NeurIPS 2020) as a searchable index.

Sign convention: I(z, x_t) = d l(x_t) / d eps for up-weighting pretraining example z by eps.
I < 0: z is helpful (a proponent); I > 0: z is harmful (an opponent).
"""
from .errors import MsifError
from .task import MultiStageTask, cross_entropy_fisher_losses, load_task, validate_task

__all__ = ["MsifError", "MultiStageTask", "cross_entropy_fisher_losses", "load_task", "validate_task"]
__version__ = "0.1.0"
