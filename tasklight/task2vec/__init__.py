"""Task2Vec: task embeddings from the Fisher information of a probe network (``embedding``,
``fisher``, ``probe``), task distances (``distances``), expert selection (``experts``)."""
from tasklight.task2vec.data import TaskData, datamodule_tasks, task_tensors
from tasklight.task2vec.distances import asymmetric_distance, distance_matrix, symmetric_distance, trivial_embedding
from tasklight.task2vec.embedding import DEFAULT_ALPHA, Task2Vec, TaskEmbedding
from tasklight.task2vec.evaluation import bootstrap_interval, pair_spearman, spearman, taxonomy_correlation
from tasklight.task2vec.experts import (ExpertRanking, ExpertSelection, evaluate_expert_selection, finetune_error,
                                        load_expert, rank_experts, transfer_error)
from tasklight.task2vec.fisher import (VariationalFisher, fisher_diagonal, fit_linear_head, per_filter,
                                       variational_fisher)
from tasklight.task2vec.probe import (ImageTransform, ProbeAdapter, omniglot_probe, pretrained_probe,
                                      set_batchnorm_stats, train_classifier)
from tasklight.task2vec.store import load_embeddings, save_embeddings, task_descriptors

__all__ = ["DEFAULT_ALPHA", "ExpertRanking", "ExpertSelection", "ImageTransform", "ProbeAdapter", "Task2Vec", "bootstrap_interval",
           "TaskData", "TaskEmbedding", "VariationalFisher", "asymmetric_distance", "datamodule_tasks",
           "distance_matrix", "evaluate_expert_selection", "finetune_error", "fisher_diagonal", "fit_linear_head",
           "load_embeddings", "load_expert", "omniglot_probe", "pair_spearman", "per_filter", "pretrained_probe", "rank_experts",
           "save_embeddings", "set_batchnorm_stats", "spearman", "symmetric_distance", "task_descriptors", "task_tensors", "taxonomy_correlation",
           "train_classifier", "transfer_error", "trivial_embedding", "variational_fisher"]
