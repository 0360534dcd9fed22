"""Networks, the cluster head, the classifiers built from them, and the checkpoint format."""
from models.classifier import ClusterClassifier, LinearClassifier
from models.cluster_head import ClusterHead
from models.resnet import ResNet18

__all__ = ["ClusterClassifier", "ClusterHead", "LinearClassifier", "ResNet18"]
