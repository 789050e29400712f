"""rewriter: a graph-rewriting optimizer for PyTorch models.

It captures a model's graph, finds attention and linear subgraphs (sibling linears such as Q/K/V
or an FFN's gate/up, linears worth quantizing or sparsifying) by what they compute (never by class
or function names), replaces them with faster equivalents, checks every replacement against the
original, and reports each site it found: what it became, or why it was left alone, and the
estimated gain.

Example::

    import rewriter
    fast = rewriter.optimize(model, (input_ids,))
    print(fast.report)

    compiled = torch.compile(model, backend="rewriter")   # same passes as a torch.compile backend
"""

from .api import OptimizedModel, optimize
from .config import Config
from .dynamo import Backend, backend, last_report
from .passes import all_passes, pass_names
from .report import PassRun, Report, Site

__version__ = "0.1.0"

__all__ = [
    "optimize",
    "OptimizedModel",
    "Config",
    "Report",
    "Site",
    "PassRun",
    "Backend",
    "backend",
    "last_report",
    "all_passes",
    "pass_names",
    "__version__",
]
