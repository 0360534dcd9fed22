"""Pretrained ResNet18 weights: where ``pretrained_weights/resnet18.pt`` comes from.

The weight files themselves are never committed; ``from_autoattack`` makes a stand-in from
the CIFAR-10 ResNet18 that the ``pyautoattack`` package ships (see README.md here).
"""
