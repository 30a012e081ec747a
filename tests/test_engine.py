"""engine.py: DDP training step equals single-process, multi-view evaluation is independent of the process count,
ranks share BN statistics before evaluating and saving, precise BN computes population statistics, a stop saves a
state that resumes exactly."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

import engine
from x3d import SubBatchNorm3d, build_model, set_bn_splits

CLIP = (3, 4, 32, 32)  # (C, T, H, W): small enough for a fast CPU test, big enough for every stage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(fn, world: int, *args) -> None:
    port = _free_port()
    mp.start_processes(fn, args=(world, port, *args), nprocs=world, start_method="fork", join=True)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("x3d_xs", num_classes=5, dropout=0.0)
    for m in model.modules():  # non-zero final BN gammas so every layer gets a gradient
        if isinstance(m, nn.BatchNorm3d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# DDP gradients: two gloo processes on halves of a batch == one process on the whole batch
# ----------------------------------------------------------------------------------------------------------------------
def _ddp_grads(rank, world, port, clips, labels, out_dir):
    _init(rank, world, port)
    model = _small_model().double()
    net = DistributedDataParallel(model, broadcast_buffers=False)
    # Rank r takes samples r, r + world, ...: with sub-batch BN split k = world in the single process, each rank's
    # batch is exactly one BN group there, so the two computations are the same.
    loss = F.cross_entropy(net(clips[rank::world]), labels[rank::world])
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out_dir, "grads.pt"))
    dist.destroy_process_group()


def test_two_process_ddp_gradients_equal_single_process(tmp_path):
    torch.manual_seed(1)
    # float64 so that summation order (per-rank vs whole batch) cannot hide or fake a difference
    clips, labels = torch.randn(8, *CLIP, dtype=torch.float64), torch.randint(0, 5, (8,))
    _run_ranks(_ddp_grads, 2, clips, labels, str(tmp_path))
    ddp = torch.load(tmp_path / "grads.pt")

    model = _small_model().double()
    set_bn_splits(model, 2)
    F.cross_entropy(model(clips), labels).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(ddp[name], p.grad, rtol=1e-7, atol=1e-10), name


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: the same video scores with 1 and 2 processes, every view counted once
# ----------------------------------------------------------------------------------------------------------------------
class ViewSet(Dataset):
    """7 videos × 3 views of random clips; item -> (clip, label, video index, view index)."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.clips = torch.randn(21, *CLIP, generator=g)

    def __len__(self):
        return 21

    def __getitem__(self, i):
        return self.clips[i], (i // 3) % 5, i // 3, i % 3


def _eval(rank, world, port, out_dir):
    if world > 1:
        _init(rank, world, port)
    model = _small_model().eval()
    data = ViewSet()
    loader = DataLoader(data, batch_size=4, sampler=range(rank, len(data), world))
    scores, targets, counts = engine.predict_videos(model, loader, 7, 5, torch.device("cpu"), progress=False)
    if rank == 0:
        torch.save((scores, targets, counts), os.path.join(out_dir, f"eval{world}.pt"))
    if world > 1:
        dist.destroy_process_group()


def test_evaluation_with_two_processes_equals_one(tmp_path):
    _eval(0, 1, 0, str(tmp_path))
    _run_ranks(_eval, 2, str(tmp_path))
    one, two = torch.load(tmp_path / "eval1.pt"), torch.load(tmp_path / "eval2.pt")
    assert torch.equal(one[2], torch.full((7,), 3.0, dtype=torch.float64)) and torch.equal(one[2], two[2])
    assert torch.equal(one[1], two[1]) and one[1].tolist() == [v % 5 for v in range(7)]
    assert torch.allclose(one[0], two[0], atol=1e-6)
    # mean softmax over each video's 3 views, computed directly
    model = _small_model().eval()
    with torch.no_grad():
        probs = model(ViewSet().clips).softmax(1).view(7, 3, 5).mean(1)
    assert torch.allclose(one[0], probs, atol=1e-5)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    acc = engine.topk_accuracy(scores, torch.tensor([1, 1, 0]), ks=(1, 2))
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(200 / 3)


def test_per_class_top1_skips_classes_without_videos():
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.2, 0.8, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0], [0.1, 0.2, 0.7, 0.0]])
    per_class = engine.per_class_top1(scores, torch.tensor([0, 1, 1, 2]), num_classes=4)
    assert per_class == {0: 100.0, 1: 50.0, 2: 100.0}  # class 3 has no video: not scored, not counted as 0


# ----------------------------------------------------------------------------------------------------------------------
# Precise BN
# ----------------------------------------------------------------------------------------------------------------------
def test_precise_bn_gives_population_statistics():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 2, 5, 5) * (i + 1) + i, torch.zeros(4, dtype=torch.long)) for i in range(5)]
    bn = nn.BatchNorm3d(3, momentum=0.1)
    model = nn.Sequential(bn)
    used = engine.precise_bn(model, batches, num_batches=5, device=torch.device("cpu"))
    assert used == 5 and bn.momentum == 0.1 and not bn.training
    # The exact average of the per-batch means and unbiased variances (what fvcore's precise BN computes).
    means = torch.stack([x.mean((0, 2, 3, 4)) for x, _ in batches])
    variances = torch.stack([x.transpose(0, 1).reshape(3, -1).var(1) for x, _ in batches])
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, variances.mean(0), atol=1e-4)


def test_non_finite_loss_stops_with_the_iteration():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 32 * 32, 5))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    loader = [(torch.randn(2, *CLIP), torch.zeros(2, dtype=torch.long))] * 3
    opt = engine.build_optimizer(model, lr=0.1, weight_decay=0.0)
    with pytest.raises(engine.NonFiniteLossError, match="epoch 3, iteration 5"):  # epochs count from 1 in messages
        engine.train_one_epoch(model, loader, opt, F.cross_entropy, epoch=2, num_iters=8, lr_at=lambda e: 0.1,
                               device=torch.device("cpu"), seed=0, start_iter=5, progress=False)


def test_optimizer_excludes_bn_and_bias_from_weight_decay():
    model = _small_model()
    decay, no_decay = engine.build_optimizer(model, lr=0.1, weight_decay=5e-5).param_groups
    assert decay["weight_decay"] == 5e-5 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm3d) for p in m.parameters()}
    assert bn_params <= {id(p) for p in no_decay["params"]}


def test_optimizer_steps_fused_and_keeps_it_when_restoring_a_loop_optimizers_state():
    """The fused step is SGD's (Nesterov, weight decay by group), and a checkpoint written by PyTorch's loop over the
    parameters (an older run) resumes with the fused step and the loop's momentum buffers."""
    torch.manual_seed(0)
    model = _small_model()
    reference = copy.deepcopy(model)
    optimizer = engine.build_optimizer(model, lr=0.1, weight_decay=5e-2)
    loop = torch.optim.SGD([{"params": [p for p in reference.parameters() if p.ndim > 1], "weight_decay": 5e-2},
                            {"params": [p for p in reference.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                           lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    assert all(group["fused"] for group in optimizer.param_groups)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        optimizer.step(), loop.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)

    resumed = engine.build_optimizer(reference, lr=0.1, weight_decay=5e-2)
    engine.restore({"model": reference.state_dict(), "optimizer": loop.state_dict()}, reference, resumed, None)
    assert all(group["fused"] and not group["foreach"] for group in resumed.param_groups)
    assert all(torch.equal(resumed.state[p]["momentum_buffer"], loop.state[p]["momentum_buffer"])
               for p in reference.parameters())


@pytest.mark.parametrize("patience", [0, 2])
def test_plateau_scale_follows_torch_reduce_lr_on_plateau(patience):
    losses = [1.0, 0.9, 0.95, 0.9, 0.91, 0.8999, 0.7, 0.7, 0.71, 0.72, 0.73, 0.69, 0.7, 0.7, 0.7, 0.7]
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    # eps=0: torch's eps only stops a decay smaller than 1e-8 in absolute terms (this sequence reaches an LR of 1e-9)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=patience, eps=0)
    for n, loss in enumerate(losses, start=1):
        reference.step(loss)
        assert engine.plateau_scale(losses[:n], patience) == pytest.approx(optimizer.param_groups[0]["lr"]), n
    assert engine.plateau_scale(losses, patience) < 1  # the sequence does reach a plateau


# ----------------------------------------------------------------------------------------------------------------------
# BN statistics across ranks, and a stop that resumes exactly
# ----------------------------------------------------------------------------------------------------------------------
def _bn_net(splits: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(3, 4, 1), SubBatchNorm3d(4, num_splits=splits), nn.Flatten(),
                         nn.Linear(4 * 2 * 3 * 3, 5))


def _sync(rank, world, port, out_dir):
    _init(rank, world, port)
    model = _bn_net(splits=2).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 2, 3, 3, generator=torch.Generator().manual_seed(rank)) * (rank + 1) + rank)
    bn = model[1]
    local = engine.copy.deepcopy(bn).eval()  # this rank's own statistics, its groups folded in
    engine.sync_bn_stats(model)
    torch.save({"local": (local.running_mean, local.running_var), "synced": (bn.running_mean, bn.running_var),
                "groups": (bn.split_mean, bn.split_var)}, os.path.join(out_dir, f"bn{rank}.pt"))
    dist.destroy_process_group()


def test_sync_bn_stats_gives_every_rank_the_pooled_statistics(tmp_path):
    _run_ranks(_sync, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"bn{r}.pt") for r in range(2)]
    means = torch.stack([r["local"][0] for r in ranks])
    variances = torch.stack([r["local"][1] for r in ranks])
    assert not torch.allclose(means[0], means[1])  # the ranks saw different batches
    pooled_var = variances.mean(0) + means.var(0, unbiased=False)  # law of total variance, ranks as groups
    for r in ranks:
        assert torch.allclose(r["synced"][0], means.mean(0), atol=1e-6)
        assert torch.allclose(r["synced"][1], pooled_var, atol=1e-5)
        # the sub-batch groups restart from the pooled statistics
        for groups, pooled in zip(r["groups"], r["synced"]):
            assert torch.equal(groups, pooled.repeat(2))


def test_a_stop_finishes_the_step_saves_and_resumes_to_the_same_state():
    torch.manual_seed(5)
    loader = [(torch.randn(2, 3, 2, 3, 3), torch.randint(0, 5, (2,))) for _ in range(6)]
    kwargs = dict(epoch=0, num_iters=6, lr_at=lambda e: 0.1, device=torch.device("cpu"), seed=0, progress=False)

    def run(model, batches, start_iter=0, meters=None, **extra):
        opt = engine.build_optimizer(model, lr=0.1, weight_decay=0.0)
        if "optimizer" in extra:
            opt.load_state_dict(extra.pop("optimizer"))
        engine.train_one_epoch(model, batches, opt, F.cross_entropy, start_iter=start_iter, meters=meters,
                               **kwargs, **extra)
        return opt

    uninterrupted = _bn_net()
    run(uninterrupted, loader)

    saved = {}
    calls = iter(range(100))
    stopped = _bn_net()
    opt = engine.build_optimizer(stopped, lr=0.1, weight_decay=0.0)

    def save_fn(it, meters):
        saved.update(iteration=it, meters=meters, model=copy.deepcopy(stopped.state_dict()),
                     optimizer=copy.deepcopy(opt.state_dict()))

    with pytest.raises(engine.TrainingStopped) as stop:  # asked to stop during the third step
        engine.train_one_epoch(stopped, loader, opt, F.cross_entropy, save_fn=save_fn,
                               should_stop=lambda: next(calls) >= 2, **kwargs)
    assert stop.value.iteration == saved["iteration"] == 3 and saved["meters"]["iters"] == 3  # that step finished

    resumed = _bn_net()
    resumed.load_state_dict(saved["model"])
    run(resumed, loader[3:], start_iter=3, meters=saved["meters"], optimizer=saved["optimizer"])
    for key, value in uninterrupted.state_dict().items():  # BN's running statistics included
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_resume_mid_epoch_with_other_processes_or_data_is_refused(tmp_path, capsys):
    state = {"model": {}, "epoch": 3, "world_size": 2, "num_train_samples": 100}
    engine.check_resumable(state, tmp_path / "checkpoint.pt", 0, 2, 100)  # the same: nothing to say
    assert capsys.readouterr().err == ""
    with pytest.raises(engine.utils.CheckpointError, match=r"checkpoint.pt was saved mid-epoch \(epoch 4, iteration "
                       r"5\) and this run has processes 1 \(the checkpoint has 2\)"):
        engine.check_resumable(state, tmp_path / "checkpoint.pt", 5, 1, 100)
    with pytest.raises(engine.utils.CheckpointError, match=r"training videos 99 \(the checkpoint has 100\)"):
        engine.check_resumable(state, tmp_path / "checkpoint.pt", 5, 2, 99)
    engine.check_resumable(state, tmp_path / "checkpoint.pt", 0, 1, 100)  # at an epoch's end: goes on, says so
    assert "batches per step and the default LR differ from here on" in capsys.readouterr().err


def test_resuming_a_file_without_training_state_points_to_finetune(tmp_path):
    weights = tmp_path / "x3d_xs.pt"
    torch.save({"model_state": {}}, weights)
    args = engine.argparse.Namespace(eval=False, resume=str(weights))
    with pytest.raises(engine.utils.CheckpointError, match=f"{weights}: not a training checkpoint of this project.*"
                                                          f"--finetune"):
        engine.starting_point(args, tmp_path)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_every_view_goes_to_one_rank_with_the_other_views_of_its_video(world, monkeypatch):
    monkeypatch.setattr(engine, "get_world_size", lambda: world)
    shares = []
    for rank in range(world):
        monkeypatch.setattr(engine.utils, "get_rank", lambda r=rank: r)
        shares.append(list(engine.rank_views(7 * 30, views_per_video=30)))
    assert sorted(v for share in shares for v in share) == list(range(7 * 30))
    owners = {v // 30: rank for rank, share in enumerate(shares) for v in share}
    assert all(owners[v // 30] == rank for rank, share in enumerate(shares) for v in share)  # videos stay whole
    assert max(map(len, shares)) - min(map(len, shares)) <= 30  # balanced to a video


def _describe(rank, world, port, out_dir, drop):
    _init(rank, world, port)
    paths = [f"/data/{rank}/video{i}.mp4" for i in range(5 - (drop and rank == 1))]  # other folders, same names
    data = type("Data", (), dict(paths=paths, missing=[], summary=lambda self: f"{len(self.paths)} videos"))()
    try:
        engine.describe_data(train=data)
        outcome = "same"
    except engine.utils.UserError as e:
        outcome = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize("drop", [False, True])
def test_ranks_that_found_different_videos_stop_together(tmp_path, drop):
    _run_ranks(_describe, 2, str(tmp_path), drop)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    if not drop:
        assert outcomes == ["same", "same"]
    else:
        assert outcomes[1].startswith("the processes found different train videos (rank 1: 4, 0 listed but missing)")
        assert "every machine must see the same data" in outcomes[0]


def test_evaluation_batches_hold_whole_videos():
    data = type("Views", (), dict(views_per_video=30, __len__=lambda self: 7 * 30, __getitem__=lambda self, i: i))()
    for batch_size, expected in [(16, 30), (8, 30), (64, 60), (90, 90)]:  # whole videos, at least one
        batches = list(engine.eval_loader(data, engine.argparse.Namespace(batch_size=batch_size, workers=0)))
        assert [len(b) for b in batches[:-1]] == [expected] * (len(batches) - 1)
        assert torch.cat(batches).tolist() == list(range(7 * 30))
    batches = list(engine.eval_loader(data, engine.argparse.Namespace(batch_size=16, workers=0), batch_size=1))
    assert len(batches) == 7 * 30  # the size asked for, as localization's whole-video items need
