"""torch.hub entry points: models that take images in [0, 1] (N, 3, 32, 32) and return logits.

    import torch
    model = torch.hub.load("path/to/this/repo", "clustr", checkpoint="expA/checkpoint.pth",
                           source="local")
    stand_in = torch.hub.load("path/to/this/repo", "resnet18_stand_in", source="local")

Both are returned on the CPU in eval mode; nothing is downloaded.
"""
dependencies = ["torch"]


def clustr(checkpoint: str, map_location="cpu", dataset: str | None = None,
           L: int | None = None, normalize: bool | None = None):
    """``ClusterClassifier.from_checkpoint(checkpoint, ...)``, a checkpoint of this project
    or of the original code."""
    from models.classifier import ClusterClassifier

    return ClusterClassifier.from_checkpoint(checkpoint, map_location, dataset=dataset, L=L,
                                             normalize=normalize)


def resnet18_stand_in(weights: str | None = None):
    """The stand-in ResNet18 ClusTR starts from (CIFAR-10, cross-entropy, not robust) through
    its linear head: ``weights``, else ``pretrained_weights/resnet18.pt`` where it exists,
    else the same weights converted in memory from the installed ``pyautoattack``."""
    from models.checkpoint import copy_weights, load_weights
    from models.classifier import LinearClassifier
    from models.resnet import ResNet18
    from pretrained_weights import from_autoattack

    backbone = ResNet18(num_classes=10)
    if not weights and not from_autoattack.DEFAULT_OUT.is_file():
        copy_weights(backbone, from_autoattack.converted()[0], from_autoattack.PACKAGE)
    else:
        load_weights(backbone, str(weights or from_autoattack.DEFAULT_OUT))
    return LinearClassifier(backbone.eval())
