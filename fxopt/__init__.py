"""fxopt: a compiler-style graph transformation framework for PyTorch models.

Capture a model as a torch.fx graph (symbolic tracing or torch.export), run composable passes
over it with a pass manager, and verify every result numerically against the original.

    >>> import torch, fxopt
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Dropout(), torch.nn.ReLU()).eval()
    >>> res = fxopt.optimize(model, (torch.randn(2, 3, 16, 16),), pipeline="remove-noops,dce")
    >>> res.verification.passed
    True
"""
from .analysis import Analysis, AnalysisManager, DataflowAnalysis, ShapeAnalysis
from .api import OptimizeResult, optimize
from .calibration import calibrate
from .capture import capture, frontend_of
from .debug import dump
from .distillation import distill
from .errors import (CaptureError, CaptureWarning, FxoptError, InputMismatchError, PassError, PassWarning, PipelineError,
                     SerializationError, TrainingModeWarning, VerificationError, VerificationWarning)
from .manager import Instrument, PassManager, PassRecord, PrintIR, TimePasses, VerifyEach
from .pass_base import Pass, PassContext, PassResult
from .pipeline import format_pipeline, parse_pipeline
from .registry import available_passes, get_pass, register_pass, unregister_pass
from .serialize import load, save
from .tracing import NotTraceable, register_traceable_forward, unregister_traceable_forward
from .verify import Tolerance, VerificationReport, verify

__version__ = "0.1.0"

__all__ = [
    "Analysis", "AnalysisManager", "CaptureError", "CaptureWarning", "DataflowAnalysis", "FxoptError", "InputMismatchError", "Instrument",
    "NotTraceable", "OptimizeResult", "Pass", "PassContext", "PassError", "PassManager", "PassRecord", "PassResult",
    "PassWarning", "PipelineError", "PrintIR", "SerializationError", "ShapeAnalysis", "TimePasses", "Tolerance", "TrainingModeWarning",
    "VerificationError", "VerificationWarning",
    "VerificationReport", "VerifyEach", "available_passes", "calibrate", "capture", "distill", "dump",
    "format_pipeline", "frontend_of", "get_pass", "load", "optimize", "parse_pipeline", "register_pass",
    "register_traceable_forward", "save", "unregister_pass", "unregister_traceable_forward", "verify",
]
