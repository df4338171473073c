"""Data: the batch contracts, episodic DataModules (sinusoid, Omniglot) and multi-task DataModules."""
from tasklight.data.batch import MetaBatch, MultiTaskBatch, TaskSpec
from tasklight.data.fashion import FashionMNISTDataModule, MultiFashionDataModule
from tasklight.data.episodes import EpisodeSet, EpisodeStream, EpisodicDataModule, NWayKShot
from tasklight.data.mtl_regression import SinusoidTasksDataModule
from tasklight.data.multitask import MultiTaskDataModule, OmniglotAlphabetsDataModule
from tasklight.data.omniglot import OmniglotDataModule, load_omniglot
from tasklight.data.sinusoid import SinusoidDataModule

__all__ = ["MetaBatch", "MultiTaskBatch", "TaskSpec", "EpisodeSet", "EpisodeStream", "EpisodicDataModule",
           "NWayKShot", "SinusoidDataModule", "OmniglotDataModule", "load_omniglot", "MultiTaskDataModule",
           "OmniglotAlphabetsDataModule", "SinusoidTasksDataModule", "FashionMNISTDataModule",
           "MultiFashionDataModule"]
