"""fundus-sdk: find the most similar graded past cases for a fundus photograph.

    import fundus_sdk
    index = fundus_sdk.Index.create("cases/")                 # bundled default model
    index.add(["a.jpg", "b.jpg"], metadata=[{"grade": 0}, {"grade": 2}])
    hits = fundus_sdk.search("new_patient.jpg", index, k=10)  # list[Hit], best first
    vectors = fundus_sdk.embed(["a.jpg", "b.jpg"])            # (2, dim) float32, unit rows
"""

from .errors import CaseIndexError, FundusError, ImageError, ModelError, ModelMismatchError, ProviderError
from .index import Hit, Index, search
from .model import Model, embed, load_model

__version__ = "0.2.0"

__all__ = [
    "embed",
    "search",
    "load_model",
    "Model",
    "Index",
    "Hit",
    "FundusError",
    "ImageError",
    "ModelError",
    "ModelMismatchError",
    "CaseIndexError",
    "ProviderError",
    "__version__",
]
