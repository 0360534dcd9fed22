"""torchrun on CPU with gloo: two processes train and evaluate like one, and fail together."""
import csv
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT

SMALL = ("--dataset", "imagefolder", "--k", 2, "--m", 3, "--d", 4, "--L", 4, "--iterations", 1,
         "--restarts", 1, "--test-batch", 8, "--embed-batch", 8, "--device", "cpu")


def launch(*args, procs: int = 2, env: dict | None = None, timeout: float = 120):
    """main_clustr.py under torchrun with ``procs`` processes (procs=0: plain python). The
    ``--`` keeps torchrun's parser off ``--m`` and ``--d`` (prefixes of its own options).
    With ``env`` (STATE_DIR, FAIL_RANK), torchrun runs ``tests/distributed_worker.py``: the
    same command with the tests' instrumentation of the epoch loop."""
    runner = ([] if procs == 0 else ["-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node", str(procs), "--"])
    environ = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    script = ROOT / ("tests/distributed_worker.py" if env else "main_clustr.py")
    return subprocess.run([sys.executable, *runner, str(script),
                           *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=environ)


@pytest.fixture(scope="module")
def two_process_run(tiny_folder, tmp_path_factory):
    """Two epochs with two processes; each rank dumps hashes of its state after each epoch."""
    base = tmp_path_factory.mktemp("ddp")
    states = base / "states"
    states.mkdir()
    out = base / "run2"
    res = launch("--checkpoint", out, "--data-root", tiny_folder, "--epochs", 2, *SMALL,
                 env={"STATE_DIR": str(states)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out, states, res


def test_two_processes_write_one_set_of_outputs(two_process_run):
    out, _, res = two_process_run
    names = sorted(os.listdir(out))
    for name in ("log.txt", "params.txt", "checkpoint.pth", "resume.pth",
                 "attack_results_ext.csv", "metrics.csv", "eval_summary.json"):
        assert name in names
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
    assert len((out / "log.txt").read_text().splitlines()) == 3  # header + 2 epochs
    # 72 training images, 2 x 3 x 4 = 24 per step: 3 steps; logged once, by rank 0
    assert res.stdout.count("effective batch 2 x 3 x 4 = 24") == 1
    assert res.stdout.count("3 steps of 3 x 4 examples per epoch") == 1
    assert res.stdout.count("epoch 2/2") == 1


def test_ranks_hold_identical_clusters_and_sampler_state(two_process_run):
    _, states, _ = two_process_run
    for epoch in (1, 2):
        rank0 = (states / f"rank0_epoch{epoch}.txt").read_text()
        rank1 = (states / f"rank1_epoch{epoch}.txt").read_text()
        assert rank0 == rank1
        names = [line.split()[0] for line in rank0.splitlines()]
        assert names[:4] == ["centers", "assignments", "variance", "losses"]
        assert "bn1.running_mean" in names and "layer4.1.bn2.running_var" in names


def _embed_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    from base.distributed import Dist
    from models.resnet import ResNet18, normalization_for
    from utils.train.embeddings import compute_embeddings_split

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = ResNet18(3, *normalization_for("imagefolder"))
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    emb = compute_embeddings_split(model, images, 4, torch.device("cpu"),
                                   Dist(rank, world, rank, enabled=True))
    if rank == 0:
        torch.save(emb, out_file)
    dist.destroy_process_group()


def test_split_embedding_pass_equals_single_pass(tmp_path):
    from models.resnet import ResNet18, normalization_for
    from utils.train.embeddings import compute_embeddings

    out_file = str(tmp_path / "emb.pt")
    torch.multiprocessing.spawn(_embed_worker, args=(2, str(tmp_path / "init"), out_file),
                                nprocs=2, join=True)
    torch.manual_seed(0)
    model = ResNet18(3, *normalization_for("imagefolder"))
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    single = compute_embeddings(model, images, 4, torch.device("cpu"))
    split = torch.load(out_file)
    assert split.shape == (16, 512)
    assert torch.equal(split, single)  # same batches of 4, same order: bit for bit


def _predictions(folder) -> dict[str, list[str]]:
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("predictions_eps"):
            with open(folder / name) as f:
                found[name] = [row["adv_pred"] for row in csv.DictReader(f)]
    return found


def test_two_process_sweep_agrees_with_one_process_evaluate_ckpt(two_process_run, tiny_folder,
                                                                  tmp_path):
    """The training run's sweep (two processes, reloaded from checkpoint.pth as
    --evaluate-ckpt does) against --evaluate-ckpt of that file in one process."""
    out, _, _ = two_process_run
    one = launch("--checkpoint", tmp_path / "one", "--evaluate-ckpt", out / "checkpoint.pth",
                 "--data-root", tiny_folder, *SMALL, procs=0)
    assert one.returncode == 0, one.stderr[-2000:]
    p1, p2 = _predictions(tmp_path / "one"), _predictions(out)
    assert len(p1) == 4 and p1.keys() == p2.keys()
    for name in p1:
        same = sum(a == b for a, b in zip(p1[name], p2[name]))
        assert len(p1[name]) == len(p2[name]) == 18
        assert same >= 0.99 * len(p1[name]), name


def test_a_failing_rank_ends_the_job(tiny_folder, tmp_path):
    begin = time.time()
    res = launch("--checkpoint", tmp_path / "fail", "--data-root", tiny_folder, "--epochs", 1,
                 "--dist-timeout", 30, *SMALL, env={"FAIL_RANK": "1"}, timeout=90)
    assert res.returncode != 0
    assert "rank 1 fails on purpose" in res.stdout + res.stderr
    assert time.time() - begin < 90


# -- interrupted and resumed under torchrun --------------------------------------------------
def _resume_state(path):
    return torch.load(path / "resume.pth", map_location="cpu", weights_only=True)


def test_stopped_and_killed_two_process_run_resumes_to_the_same_log(tiny_folder, tmp_path):
    """Free replays (each process carries its own delta). SIGTERM to rank 1 alone, mid-epoch:
    both processes stop at that step with the one line. Resumed, rank 0 is SIGKILLed after
    epoch 1 (once it has written the state; the job then ends). Resumed again, the run ends
    with the log.txt and sweep of an uninterrupted 2-process run."""
    common = ("--data-root", tiny_folder, "--epochs", 2, "--minibatch-replays", 2, *SMALL)
    ref, exp = tmp_path / "ref", tmp_path / "exp"
    res = launch("--checkpoint", ref, *common)
    assert res.returncode == 0, res.stderr[-3000:]

    res = launch("--checkpoint", exp, *common,
                 env={"CLUSTR_TEST_SIGNAL_AT": "train-step-1-1@1"})
    assert res.returncode != 0
    assert res.stderr.count("stopped by SIGTERM in epoch 1 after step 1: state saved in") == 2
    state = _resume_state(exp)
    assert (state["epoch"], state["step"]) == (0, 1)
    delta = state["trainer"]["free_delta"]  # one per process
    assert delta["sizes"].tolist() == [12, 12] and delta["rows"].shape[0] == 24
    assert not torch.equal(delta["rows"][:12], delta["rows"][12:])

    res = launch("--checkpoint", exp, *common, "--resume",
                 env={"CLUSTR_TEST_KILL_AT": "train-epoch-1@0"})
    assert res.returncode != 0
    assert _resume_state(exp)["epoch"] == 1
    assert len((exp / "log.txt").read_text().splitlines()) == 2  # header + epoch 1

    res = launch("--checkpoint", exp, *common, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (ref / "log.txt").read_bytes() == (exp / "log.txt").read_bytes()
    assert _predictions(ref) == _predictions(exp)
    log = (exp / "run.log").read_text()
    assert log.count("epoch 1/2") == 1 and log.count("epoch 2/2") == 1
    assert "stopped by SIGTERM" in log and log.count("resuming after epoch") == 2


def test_non_finite_loss_on_one_process_ends_all_at_once(tiny_folder, tmp_path):
    begin = time.time()
    res = launch("--checkpoint", tmp_path / "nan", "--data-root", tiny_folder, "--epochs", 1,
                 "--dist-timeout", 600, *SMALL, env={"NAN_RANK": "1"}, timeout=400)
    assert res.returncode != 0
    assert time.time() - begin < 300  # not the 600 s of --dist-timeout
    err = res.stderr
    assert "training stopped in epoch 1: non-finite loss at step 2;" in err
    assert "non-finite loss at step 2 on another process" in err  # rank 0 stops too
    assert "watchdog" not in err.lower()
