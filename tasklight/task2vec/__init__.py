"""Task2Vec: task embeddings from the Fisher information of a probe network, task distances,
expert selection."""
from tasklight.task2vec.embedding import (DEFAULT_ALPHA, ExpertRanking, ExpertSelection, ProbeAdapter, Task2Vec,
                                          TaskEmbedding, asymmetric_distance, datamodule_tasks, distance_matrix,
                                          evaluate_expert_selection, fisher_diagonal, load_embeddings, load_expert,
                                          rank_experts, save_embeddings, symmetric_distance, task_descriptors,
                                          trivial_embedding)

__all__ = ["DEFAULT_ALPHA", "ExpertRanking", "ExpertSelection", "ProbeAdapter", "Task2Vec", "TaskEmbedding",
           "asymmetric_distance", "datamodule_tasks", "distance_matrix", "evaluate_expert_selection",
           "fisher_diagonal", "load_embeddings", "load_expert", "rank_experts", "save_embeddings",
           "symmetric_distance", "task_descriptors", "trivial_embedding"]
