"""Pretrained ResNet18 weights, never committed: ``from_autoattack`` makes the stand-in
``resnet18.pt`` from the network the ``pyautoattack`` package ships (see README.md here)."""
