"""fundus-sdk: find the most similar graded past cases for a fundus photograph.

    import fundus_sdk
    index = fundus_sdk.Index.create("cases/")                 # bundled default model
    index.add(["a.jpg", "b.jpg"], metadata=[{"grade": 0}, {"grade": 2}])
    hits = fundus_sdk.search("new_patient.jpg", index, k=10)  # list[Hit], best first
    results = fundus_sdk.query(["a.jpg", "b.jpg"], index)     # per photo: verdict, hits, error
    vectors = fundus_sdk.embed(["a.jpg", "b.jpg"])            # (2, dim) float32, unit rows
    verdicts = fundus_sdk.load_model().check(["a.jpg"])       # is it a gradable fundus photo?
    fundus_sdk.report("new_patient.jpg", index).write_html("report.html")  # photos + heatmaps
"""

from . import metrics
from .embeddings import Embeddings, read_embeddings, write_embeddings
from .errors import CaseIndexError, Exit, FundusError, ImageError, ModelError, ModelMismatchError, ProviderError
from .evaluation import evaluate_index
from .explain import Explanation
from .gate import NotFundusError, UngradableWarning, Verdict
from .index import BatchHits, Case, Hit, Index, QueryResult, RebuildReport, Settings, query, rebuild, search
from .inputs import Decoded, decode, find_images
from .labels import GRADES, ICDR, Label, LabelError, Scale, read_labels
from .model import Model, embed, load_model
from .preprocess import Preprocess
from .report import Report, report

__version__ = "0.3.0"

__all__ = [
    # embedding and search
    "embed",
    "search",
    "query",
    "QueryResult",
    "load_model",
    "Model",
    "Index",
    "Settings",
    "Case",
    "Hit",
    "BatchHits",
    "rebuild",
    "RebuildReport",
    # seeing the cases
    "report",
    "Report",
    "Explanation",
    # the input gate
    "Verdict",
    "NotFundusError",
    "UngradableWarning",
    # inputs, labels, files
    "decode",
    "Decoded",
    "find_images",
    "Preprocess",
    "GRADES",
    "Scale",
    "ICDR",
    "Label",
    "read_labels",
    "Embeddings",
    "read_embeddings",
    "write_embeddings",
    # judging retrieval
    "evaluate_index",
    "metrics",
    # errors and exit codes
    "FundusError",
    "ImageError",
    "LabelError",
    "ModelError",
    "ModelMismatchError",
    "CaseIndexError",
    "ProviderError",
    "Exit",
    "__version__",
]
