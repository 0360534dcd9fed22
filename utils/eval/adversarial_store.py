"""``--save-adv``: the adversarial images that fooled the model, in ``adversarial.pt``.

Its format is in docs/failures.md. Every image is re-checked before it is written (inside the
eps-ball around its test image, inside [0, 1], misclassified by the model on a fresh forward
pass); one that fails is left out, with a warning.
"""
from __future__ import annotations

import logging

import torch

from base.io import save_atomic
from datasets.data import ImageData, to_float
from utils.attacks.pgd import in_threat_model
from utils.attacks.sweep import predictions

log = logging.getLogger("clustr")

FORMAT = "clustr-adversarial-1"
SKIP = ("clean", "paper-pgd", "worst-case")


def _entry(model, data: ImageData, o, name: str, batch: int, device, logit: bool) -> dict:
    """The re-checked images of outcome ``o`` (rows of ``data``), as attack ``name``: in the
    eps-ball and [0, 1], and misclassified by ``model`` (its logit's or ``predict``'s
    arg-max) on a fresh pass."""
    (rows, images), eps = o.adv, o.eps
    labels = data.labels[rows]
    pred = predictions(model, images, batch, device, logits=logit)
    valid = in_threat_model(to_float(data.images[rows]), images, eps / 255) & (pred != labels)
    if not valid.all():
        log.warning("--save-adv: %d %s image(s) at eps %g/255 failed the re-check (outside the "
                    "eps-ball or [0, 1], or classified correctly) and are left out",
                    int((~valid).sum()), name, eps)
    return {"attack": name, "eps": float(eps),
            "prediction": "logit arg-max" if logit else "paper scores arg-max",
            "indices": data.indices[rows][valid].clone(), "labels": labels[valid].clone(),
            "pred": pred[valid].clone(), "images": images[valid].float().contiguous().clone()}


def strongest(outcomes) -> dict:
    """Per eps, the outcome of the attack with the lowest accuracy (the first on ties)."""
    best = {}
    for o in outcomes:
        if o.attack in SKIP or o.adv is None:
            continue
        if o.eps not in best or o.accuracy < best[o.eps].accuracy:
            best[o.eps] = o
    return best


def save_adversarial(path: str, model, test: ImageData, paper, sub: ImageData | None = None,
                     outcomes=(), batch: int = 64, device="cpu") -> dict:
    """Write ``path`` from the paper sweep's per-eps images (rows of ``test``) and the strong
    outcomes' (rows of ``sub``, the strong attacks' subset); returns what was written."""
    device = torch.device(device)
    store = {"format": FORMAT, "epsilons": [float(r.eps) for r in paper.per_eps],
             "paper-pgd": {}, "strongest": {}}
    for r in paper.per_eps:
        if r.adv is not None:
            store["paper-pgd"][f"{r.eps:g}"] = _entry(model, test, r, "paper-pgd", batch,
                                                      device, logit=False)
    for eps, o in sorted(strongest(outcomes).items()):
        store["strongest"][f"{eps:g}"] = _entry(model, sub, o, o.attack, batch, device, logit=True)
    save_atomic(store, path)
    counts = ", ".join(f"{e}/255 {v['attack']} {len(v['indices'])}"
                       for part in ("paper-pgd", "strongest") for e, v in store[part].items())
    log.info("--save-adv: adversarial images written to %s (%s)", path, counts or "none")
    return store
