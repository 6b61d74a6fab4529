"""Specialist ensembles (Hinton et al. 2015, section 5): a generalist plus specialists on
confusable classes.

Everything is built on a logit cache of the generalist (one model, or the ensemble whose members
the cache holds) and on the one training loop, :func:`pipeline.training.fit`. The modules, in the
order of the method:

- ``clustering``: which classes the generalist confuses (k-means on a class-similarity matrix,
  automatic K by modularity); :data:`SIMILARITIES` (a registry). numpy only.
- ``config``: ``SpecialistsConfig``, the options of every step, and :data:`SPECIALIST_INITS`.
- ``specialist``: one specialist: the class map onto its classes + a dustbin, its training rows,
  its initial weights from a generalist member, and its training (a dask task).
- ``combine``: the test-time KL combination of generalist and specialists, its measurement
  (Table 4) and the Markdown report.
- ``steps``: ``cluster`` / ``train`` / ``evaluate``, the steps that read a ``SpecialistsConfig``
  and write the output directory; :func:`run_steps`.
"""

from pipeline.experiments.specialists.clustering import (
    MODULARITY_TOLERANCE,
    SIMILARITIES,
    Clustering,
    cluster_classes,
    clusters_report,
    coprediction,
    group_confusion,
    modularity,
    similarity_matrix,
)
from pipeline.experiments.specialists.combine import (
    active_specialists,
    combination_objective,
    combine_distributions,
    evaluate_combination,
    evaluation_report,
    generalist_log_probs,
    table4,
)
from pipeline.experiments.specialists.specialist import (
    DUSTBIN,
    SamplingPlan,
    SpecialistTask,
    cached_generalist,
    collapse_log_probs,
    collapse_logits,
    generalist_members,
    run_tasks,
    sampling_plan,
    specialist_from_generalist,
    specialist_labels,
    train_specialist,
    transfer_set,
)
from pipeline.experiments.specialists.steps import (
    STEPS,
    check_groups,
    evaluate_all,
    fit_clusters,
    run_steps,
    train_all,
)

__all__ = [
    "DUSTBIN",
    "MODULARITY_TOLERANCE",
    "SIMILARITIES",
    "STEPS",
    "Clustering",
    "SamplingPlan",
    "SpecialistTask",
    "active_specialists",
    "cached_generalist",
    "check_groups",
    "cluster_classes",
    "clusters_report",
    "collapse_log_probs",
    "collapse_logits",
    "combination_objective",
    "combine_distributions",
    "coprediction",
    "evaluate_all",
    "evaluate_combination",
    "evaluation_report",
    "fit_clusters",
    "generalist_log_probs",
    "generalist_members",
    "group_confusion",
    "modularity",
    "run_steps",
    "run_tasks",
    "sampling_plan",
    "similarity_matrix",
    "specialist_from_generalist",
    "specialist_labels",
    "table4",
    "train_all",
    "train_specialist",
    "transfer_set",
]
