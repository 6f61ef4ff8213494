"""Linear relational embeddings (Hernandez, Sen Sharma et al. 2023): fit ``z ≈ β W h + b`` from exact
Jacobians, measure faithfulness and causality against baselines, sweep hyperparameters, and draw the
attribute lens. Everything goes through the architecture adapters (transformers and Mamba alike).

>>> import factlab, factlab.lre as lre                                  # doctest: +SKIP
>>> lm = factlab.load("smollm2-135m")                                   # doctest: +SKIP
>>> rel = factlab.data.load_relation("country_capital_city")            # doctest: +SKIP
>>> op = lre.fit(lm, rel, layer=8, beta=2.0)                            # doctest: +SKIP
"""

from factlab.lre.evaluate import EvalSettings, RelationResult, evaluate_relation, evaluate_relations, table_markdown
from factlab.lre.fit import fit, identity, learned_linear, query_prompt, translation
from factlab.lre.jacobian import Jacobians, jacobian, jacobian_reference
from factlab.lre.lens import LensGrid, attribute_lens, lens, lens_operator
from factlab.lre.metrics import Causality, Faithfulness, causality, edit_pairs, faithfulness, insert_subject
from factlab.lre.operator import LRE, low_rank, low_rank_pinv
from factlab.lre.prompts import (
    KnownFilter,
    TooFewKnownError,
    filter_known,
    icl_prompt,
    is_nontrivial_prefix,
    paper_split,
    recall_at_k,
    require_known,
)
from factlab.lre.states import compute_states
from factlab.lre.sweep import SweepResult, split_known, sweep

__all__ = [
    "LRE", "Causality", "EvalSettings", "Faithfulness", "Jacobians", "KnownFilter", "LensGrid", "RelationResult",
    "SweepResult", "TooFewKnownError", "attribute_lens", "causality", "compute_states", "edit_pairs",
    "evaluate_relation", "evaluate_relations", "faithfulness", "filter_known", "fit", "icl_prompt", "identity",
    "insert_subject", "is_nontrivial_prefix", "jacobian", "jacobian_reference", "learned_linear", "lens", "lens_operator", "low_rank",
    "low_rank_pinv", "paper_split", "recall_at_k", "require_known", "split_known", "sweep", "table_markdown",
    "query_prompt", "translation",
]
