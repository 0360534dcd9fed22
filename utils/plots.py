"""Pictures of a ClusTR model: its clusters, how two attacks move features, its training curves.

    python -m utils.plots expA/checkpoint.pth --data-root ./data --out clusters.png [--tsne]

``clusters.json`` beside the picture holds the projection (PCA: its mean and components, so
any 512-d point can be placed); docs/usage.md ("Pictures of a model") describes both files.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from base.cli import ArgParser, config, nonneg_int, pos_float, pos_int, run_command
from base.device import resolve_device
from base.errors import UsageError
from base.io import load_checkpoint, pyplot, save_figure, write_text_atomic
from base.progress import set_quiet
from datasets.data import DATASETS, balanced_subset, check_available, load_dataset, to_float
from models.classifier import ClusterClassifier
from utils.attacks.pgd import PGD, logit_ce_loss, paper_loss, pgd_restart, start_keys
from utils.outputs import files
from utils.outputs.results import LOSS_TERMS, read_csv
from utils.train.embeddings import compute_embeddings

log = logging.getLogger("clustr")
ATTACKS = {"paper PGD": paper_loss, "PGD-CE": logit_ce_loss}


def moved_points(model: ClusterClassifier, data, pred: torch.Tensor, n: int, eps: float,
                 iterations: int, seed: int, device) -> dict:
    """``n`` images among those ``pred`` classifies correctly (seeded pick): their clean
    embeddings and, per attack, the embeddings and predictions after PGD at ``eps`` (units
    of 1/255)."""
    correct = (pred == data.labels).nonzero().flatten()
    pick = correct[torch.randperm(len(correct), generator=torch.Generator().manual_seed(
        seed))[:n]].sort().values
    x, y = to_float(data.images[pick]).to(device), data.labels[pick].to(device)
    keys = start_keys(seed, 0, 0, data.indices[pick])
    out = {"rows": pick, "clean": model.embed(x).detach().cpu()}
    for name, loss in ATTACKS.items():
        res = pgd_restart(model, x, y, eps / 255, PGD(name, loss, iterations, 1, 2 / 255), keys)
        with torch.no_grad():
            adv = x + res.delta
            out[name] = (model.embed(adv).cpu(), model.predict(adv).cpu())
    return out


def project(emb: np.ndarray, extra: list[np.ndarray], tsne: bool, seed: int):
    """2-d coordinates of ``emb`` and of each array in ``extra``, and what the projection
    is: PCA fitted on ``emb`` (its mean and components), or t-SNE of everything together."""
    if not tsne:
        from sklearn.decomposition import PCA

        pca = PCA(2, random_state=seed).fit(emb)
        info = {"method": "pca", "mean": pca.mean_.tolist(),
                "components": pca.components_.tolist(),
                "explained_variance_ratio": pca.explained_variance_ratio_.tolist()}
        return pca.transform(emb), [pca.transform(e) for e in extra], info
    from sklearn.manifold import TSNE

    both = np.concatenate([emb, *extra])
    flat = TSNE(2, perplexity=min(30.0, len(both) - 1.0), init="pca",
                random_state=seed).fit_transform(both)
    sizes = np.cumsum([len(emb)] + [len(e) for e in extra])
    parts = np.split(flat, sizes[:-1])
    return parts[0], parts[1:], {"method": "tsne"}


def draw_clusters(path: str, coords, labels, centres, centre_classes, moves, names, title):
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7, 6))
    for c, name in enumerate(names):
        mine = labels == c
        ax.scatter(coords[mine, 0], coords[mine, 1], s=6, alpha=0.35,
                   color=cmap(c % cmap.N), label=name if len(names) <= 20 else None)
    ax.scatter(centres[:, 0], centres[:, 1], marker="*", s=220,
               c=[cmap(int(k) % cmap.N) for k in centre_classes], edgecolors="black",
               linewidths=1.2, label="cluster centres", zorder=3)
    for (name, ends), style in zip(moves["ends"].items(), ("-", "--")):
        for start, end in zip(moves["clean"], ends):
            ax.annotate("", xy=end, xytext=start, zorder=4, arrowprops=dict(
                arrowstyle="->", linestyle=style, color="black", lw=1.3))
        ax.plot([], [], style, color="black", label=f"{name} at {moves['eps']:g}/255")
    ax.scatter(moves["clean"][:, 0], moves["clean"][:, 1], s=30, facecolors="white",
               edgecolors="black", zorder=5, label="attacked images (clean)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best", markerscale=1.5)
    fig.tight_layout()
    save_figure(fig, path)


def draw_curves(metrics_path: str, path: str) -> None:
    """Loss terms (left) and accuracies (right) per epoch from ``metrics.csv``."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    rows = read_csv(metrics_path)
    if not rows or "epoch" not in rows[0]:
        raise UsageError(f"{metrics_path}: no epochs (a metrics.csv of main_clustr.py?)")
    epochs = [int(r["epoch"]) for r in rows]

    def column(name):
        return [float(r[name]) for r in rows]

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in (*LOSS_TERMS, "train_loss", "test_loss"):
        if any(column(name)):  # a disabled term is 0 throughout
            left.plot(epochs, column(name), marker="o", label=name)
    left.set(xlabel="epoch", ylabel="loss", title="loss terms (mean per step) and full-set "
             "losses")
    for name in ("train_acc", "test_acc"):
        right.plot(epochs, column(name), marker="o", label=name)
    right.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(0, 100))
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


@dataclass(frozen=True)
class PictureSettings:
    """What the cluster picture shows: ``points`` images moved by each attack of ``eps``/255
    in ``iterations`` PGD steps, projected by t-SNE (``tsne``) or PCA; ``seed`` picks the
    images and the random starts."""

    points: int
    eps: float
    iterations: int
    seed: int
    tsne: bool


def cluster_picture(model: ClusterClassifier, test, s: PictureSettings, out: str, name: str,
                    device: torch.device) -> dict:
    """Embed, attack, project and draw ``model`` (called ``name`` in the title) on the
    images ``test`` into ``out``; returns what ``clusters.json`` holds."""
    emb = compute_embeddings(model.backbone, test.images, 256, device, desc="embed test")
    pred = model.head.predict(emb.to(device)).cpu()
    moves = moved_points(model, test, pred, s.points, s.eps, s.iterations, s.seed, device)
    centres = model.head.centers.cpu().numpy()
    extra = [centres, moves["clean"].numpy()] + [moves[n][0].numpy() for n in ATTACKS]
    coords, (c2, clean2, *ends), info = project(emb.numpy(), extra, s.tsne, s.seed)
    names = model.class_names or [str(c) for c in range(model.num_classes)]
    for attack in ATTACKS:
        shift = (moves[attack][0] - moves["clean"]).norm(dim=1).median()
        flipped = int((moves[attack][1] != test.labels[moves["rows"]]).sum())
        log.info("%s at %g/255: median feature shift %.3g (l2), %d of %d predictions changed",
                 attack, s.eps, shift, flipped, len(moves["rows"]))
    title = (f"{name}: {len(test)} test embeddings ({info['method'].upper()}), "
             f"{len(centres)} clusters")
    draw_clusters(out, coords, test.labels.numpy(), c2, model.head.classes.cpu().numpy(),
                  {"clean": clean2, "ends": dict(zip(ATTACKS, ends)), "eps": s.eps}, names,
                  title)
    info.update(centres=c2.tolist(), centre_classes=model.head.classes.tolist(),
                eps=s.eps, iterations=s.iterations, points=[
                    {"test_row": int(r), "label": int(test.labels[r]), "clean": clean2[i].tolist(),
                     **{n: {"xy": ends[j][i].tolist(), "pred": int(moves[n][1][i])}
                        for j, n in enumerate(ATTACKS)}}
                    for i, r in enumerate(moves["rows"].tolist())])
    return info


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m utils.plots",
                  description="A picture of a ClusTR checkpoint's clusters (and of two attacks "
                              "moving features), and its training curves.",
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a ClusTR checkpoint (e.g. expA/checkpoint.pth)")
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help="test set to embed (default: the checkpoint's, else cifar10)")
    p.add_argument("--data-root", default="./data", help="data folder (as main_clustr.py)")
    p.add_argument("--out", default="clusters.png", help="the cluster picture (PNG); "
                   "clusters.json is written beside it")
    p.add_argument("--tsne", action="store_true", help="t-SNE instead of PCA")
    p.add_argument("--test-subset", type=pos_int, default=1000, metavar="N",
                   help="draw at most N test images (a seeded, class-balanced subset)")
    p.add_argument("--points", type=pos_int, default=6, help="images whose moves are drawn")
    p.add_argument("--eps", type=pos_float, default=8.0, help="attack eps, units of 1/255")
    p.add_argument("--iterations", type=nonneg_int, default=20,
                   help="PGD steps of 2/255 (one random start)")
    p.add_argument("--seed", type=int, default=111, help="image pick and random starts")
    p.add_argument("--metrics", default=None, help="metrics.csv to draw (default: the one "
                   "beside the checkpoint, where there is one)")
    p.add_argument("--curves-out", default=None, help="the training curves (PNG; default: "
                   "training_curves.png beside --out)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=nonneg_int, default=4, help="image-folder decoding threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> None:
    """Every input checked before anything is read at length or written."""
    ckpt = load_checkpoint(args.checkpoint)
    args.dataset = args.dataset or ckpt.get("dataset") or "cifar10"
    beside = os.path.join(os.path.dirname(args.checkpoint), files.METRICS)
    metrics = args.metrics or (beside if os.path.isfile(beside) else None)
    if metrics and not os.path.isfile(metrics):
        raise UsageError(f"--metrics {metrics}: no such file")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {args.out}: the folder {folder} does not exist")
    check_available(args.dataset, args.data_root, ("test",))
    set_quiet(args.quiet)
    device = resolve_device(args.device)
    model = ClusterClassifier.from_checkpoint(args.checkpoint, device, dataset=args.dataset)
    test = load_dataset(args.dataset, args.data_root, "test", workers=args.workers)
    test = balanced_subset(test, min(args.test_subset, len(test)), args.seed)
    name = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
    info = cluster_picture(model, test, config(PictureSettings, args), args.out, name, device)
    report = os.path.splitext(args.out)[0] + ".json"
    write_text_atomic(report, json.dumps(info) + "\n")
    log.info("wrote %s and %s (%s)", args.out, report, info["method"])
    if metrics:
        curves = args.curves_out or os.path.join(folder, "training_curves.png")
        draw_curves(metrics, curves)
        log.info("wrote %s from %s", curves, metrics)
    else:
        log.info("no metrics.csv beside %s: no training curves (pass --metrics)", args.checkpoint)


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
