"""Networks and the cluster head."""
from models.classifier import ClusterClassifier
from models.cluster_head import ClusterHead
from models.resnet import ResNet18

__all__ = ["ClusterClassifier", "ClusterHead", "ResNet18"]
