"""The training side: model, losses, offline weights, data checks and a real tiny run."""

from tests.shared import require

require("torch")  # the training and export tests: skipped (locally) or failed (CI) without it

import csv
import json
import os
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fundus_sdk.errors import Exit
from fundus_sdk.preprocess import Preprocess
from tests.shared import FIXTURES, eyepacs_sample, require_idrid
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.config import TrainConfig, split_records
from training.data import BalancedBatches, LabelError, read_labels
from training.evaluate import best_weights, embed_members, evaluate, sweep_weights
from training.losses import batch_hard_triplet_loss, fine_triplet_loss, metric_loss, ordinal_loss, relevant_degree
from training.model import FundusNet, MirrorAttention, ModelConfig
from training.probe import auc, linear_probe
from training.train import train
from training.weights import WeightsUnavailable, imagenet_state_dict

pytestmark = pytest.mark.slow  # trains networks with torch: the full suite's tier (pytest -m 'not slow' leaves it out)


def photo_batch(n: int = 2) -> torch.Tensor:
    pp = Preprocess()
    return torch.from_numpy(np.stack([pp(p) for p, _ in eyepacs_sample(n)]))


def test_mirror_attention_is_identity_at_initialisation():
    attn = MirrorAttention(32).eval()
    a = torch.randn(2, 32, 6, 6)
    outs = attn(a, {"h": a.flip(3), "v": a.flip(2)})
    assert len(outs) == 2
    for y in outs:
        torch.testing.assert_close(y, a)


@pytest.mark.parametrize("mirroring", ["feature", "image", "none"])
def test_descriptor_is_unit_norm_and_deterministic(mirroring):
    torch.manual_seed(0)
    net = FundusNet(ModelConfig(mirroring=mirroring, dim=64), pretrained=False).eval()
    x = net.normalise(photo_batch(2))
    with torch.no_grad():
        a, b = net(x), net(x)
    assert a.shape == (2, 64)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a[0] @ a[1]).item() < 0.9999  # two photos, two descriptors


def clustered(labels: torch.Tensor, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1)
    emb = centres[labels] + spread * torch.randn(len(labels), 16, generator=g)
    return torch.nn.functional.normalize(emb, dim=1)


@pytest.mark.parametrize("name", ["fine", "circle", "batch-hard"])
def test_losses_prefer_separated_batches_and_have_finite_gradients(name):
    labels = torch.arange(5).repeat_interleave(4)
    separated = clustered(labels, 0.1).requires_grad_()
    shuffled = labels[torch.randperm(20, generator=torch.Generator().manual_seed(1))]
    agreement = torch.linspace(0.5, 1.0, 20)
    good = metric_loss(name, separated, labels, agreement)
    bad = metric_loss(name, separated, shuffled, agreement)
    assert good.item() < bad.item()
    bad.backward()  # the shuffled batch is the one every loss must push on
    assert torch.isfinite(separated.grad).all() and separated.grad.abs().sum() > 0


def test_relevant_degree_weighs_pairs_whose_fine_structure_differs():
    w = relevant_degree(torch.tensor([0.9, 0.9, 0.45]))
    torch.testing.assert_close(w, w.t())
    assert w[0, 1].item() == pytest.approx(1.0)
    assert w[0, 2].item() == pytest.approx(2.0)
    labels = torch.zeros(3, dtype=torch.long)
    emb = clustered(torch.tensor([0, 0, 1]), 0.5)
    two = torch.cat([labels, labels + 1])
    both = torch.cat([emb, emb])
    assert fine_triplet_loss(both, two, relevant_degree(torch.tensor([0.9, 0.9, 0.45] * 2))).item() != pytest.approx(
        fine_triplet_loss(both, two).item()
    )
    assert batch_hard_triplet_loss(both, two).item() >= 0


def test_augmented_views_stay_fundus_photos_with_a_black_surround():
    """Photometric augmentation must not light up the surround: the field of view (and so the
    crop and the mask preprocessing finds) must stay that of the photo."""
    import random

    from fundus_sdk.preprocess import fov_box
    from training.data import augment

    photo = Image.open(FIXTURES / "retina.jpg").convert("RGB").resize((256, 256))
    box = np.array(fov_box(photo))
    for seed in range(12):
        view = augment(photo, random.Random(seed))
        a = np.asarray(view)
        assert view.size == photo.size and a[:8, :8].max() <= 12 and a[-8:, -8:].max() <= 12
        assert np.abs(np.array(fov_box(view)) - box).max() <= 40  # rotation/scale move it a little
        assert 20 < a[96:160, 96:160].mean() < 250


def test_imagenet_weights_load_offline_and_see_a_cat():
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(imagenet_state_dict("tf_efficientnet_lite0"))
    net.eval()
    cat = np.asarray(Image.open(FIXTURES / "chelsea.jpg").convert("RGB").resize((224, 224)))
    x = (torch.from_numpy(cat).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        top = net(x).argmax(1).item()
    assert 281 <= top <= 285  # the ImageNet cat classes (tabby, tiger cat, Persian, Siamese, Egyptian)


def test_unknown_backbone_weights_are_a_clear_error():
    with pytest.raises(WeightsUnavailable, match="no offline ImageNet weights"):
        imagenet_state_dict("resnet50")


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize(
    "rows, fields, message",
    [
        ([{"image": "x.jpg"}], ["image"], "missing column"),
        ([{"image": "nowhere.jpg", "grade": 1}], ["image", "grade"], "row 2 .*not found"),
        ([{"image": "PHOTO", "grade": 7}], ["image", "grade"], "row 2 .*outside the scale 0-4"),
        ([{"image": "PHOTO", "grade": "two"}], ["image", "grade"], "not a whole number"),
    ],
)
def test_bad_label_files_fail_at_once_naming_the_row(tmp_path, rows, fields, message):
    photo = str(eyepacs_sample(1)[0][0])
    rows = [{k: (photo if v == "PHOTO" else v) for k, v in r.items()} for r in rows]
    with pytest.raises(LabelError, match=message):
        read_labels(write_csv(tmp_path / "labels.csv", rows, fields))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """64 shared photos (balanced-ish, patient ids kept) plus one unreadable file, as a CSV."""
    root = tmp_path_factory.mktemp("tiny")
    sample = eyepacs_sample(8, split="train", per_grade=True) + eyepacs_sample(6, split="test", per_grade=True)
    rows = [{"image": str(p), "grade": g, "patient": p.name.split("_")[0], "split": "train"} for p, g in sample[:40]]
    rows += [{"image": str(p), "grade": g, "patient": p.name.split("_")[0], "split": "test"} for p, g in sample[40:]]
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append({"image": str(root / "broken.jpg"), "grade": 0, "patient": "broken", "split": "train"})
    return write_csv(root / "labels.csv", rows, ["image", "grade", "patient", "split"])


def tiny_config(data: Path, out: Path, cache: Path, **kw) -> TrainConfig:
    return TrainConfig(
        data=str(data), out=str(out), epochs=3, aug_views=1, batch_size=20, balance_power=0.0, batches_per_epoch=6,
        lr=3e-3, val_fraction=0.2, cache_dir=str(cache), seed=3, **kw,
    )


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tiny_data, root / "a", root / "cache")
    best = train(cfg, ModelConfig(dim=64, input_size=128))
    return cfg, best


def test_tiny_training_run_lowers_the_loss_and_saves_a_full_checkpoint(tiny_run):
    cfg, best = tiny_run
    last = torch.load(Path(cfg.out) / "last.pt", weights_only=True)
    losses = [h["loss"] for h in last["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["model_config"]["dim"] == 64 and ckpt["model_config"]["backbone"] == "tf_efficientnet_lite0"
    assert ckpt["train_config"]["seed"] == 3 and ckpt["train_config"]["preprocess"]["size"] == 128
    assert ckpt["data"]["train"]["images"] + ckpt["data"]["validation"]["images"] == 40  # broken one skipped
    assert 0 <= ckpt["test"]["micro"]["mHR"] <= 1 and set(ckpt["test"]["per_grade"]["mHR"]) == {0, 1, 2, 3, 4}
    log = (Path(cfg.out) / "log.txt").read_text()
    assert "skipped unreadable image" in log and "broken.jpg" in log


def test_interrupted_and_resumed_run_repeats_the_same_seeded_run(tiny_run, tiny_data, tmp_path):
    cfg, _ = tiny_run
    reference = [h["loss"] for h in torch.load(Path(cfg.out) / "last.pt", weights_only=True)["history"]]
    again = tiny_config(tiny_data, tmp_path / "b", Path(cfg.cache_dir), stop_after=2)
    train(again, ModelConfig(dim=64, input_size=128))
    halfway = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert halfway["epoch"] == 1 and "test" not in torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    train(tiny_config(tiny_data, tmp_path / "b", Path(cfg.cache_dir)), ModelConfig(dim=64, input_size=128), resume=True)
    resumed = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 2 and "resumed from" in (tmp_path / "b" / "log.txt").read_text()
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(reference, rel=1e-4)


def test_the_trunk_cache_is_found_whatever_the_spelling_of_the_image_paths(tiny_run, tiny_data, tmp_path):
    cfg, _ = tiny_run
    cache = Path(cfg.cache_dir)
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    with open(tiny_data, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # the same images, named relative to another folder
        row["image"] = os.path.relpath(row["image"], tmp_path)
    relative = write_csv(tmp_path / "labels.csv", rows, list(rows[0]))
    train(tiny_config(relative, tmp_path / "c", cache, stop_after=1), ModelConfig(dim=64, input_size=128))
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before  # nothing recomputed


def test_ablation_runner_trains_evaluates_and_tabulates(tiny_data, tmp_path):
    from training.ablate import run

    base = tiny_config(tiny_data, tmp_path / "unused", tmp_path / "cache", stop_after=0)
    results = run(base, ModelConfig(dim=64, input_size=128), tmp_path / "abl", ["imagenet-gem", "gem-fine"], [0])
    assert [r["variant"] for r in results] == ["imagenet-gem", "gem-fine"]
    assert all(0 <= r["report"]["micro"]["mHR"] <= 1 for r in results)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # untrained and trained variants share the trunk cache
    costs = json.loads((tmp_path / "abl" / "costs.json").read_text())
    assert set(costs) == {"imagenet-gem", "gem-fine"} and all(c["ms_per_image"] > 0 for c in costs.values())
    table = (tmp_path / "abl" / "ABLATIONS.md").read_text()
    assert "| imagenet-gem | 1 |" in table and "| gem-fine | 1 |" in table and "| chance |" in table
    assert table.count("per query grade") == 4  # mHR, mAP, AP, NDCG
    again = run(base, ModelConfig(dim=64, input_size=128), tmp_path / "abl", ["gem-fine"], [0])
    assert len(again) == 2  # finished runs are kept, not repeated


@pytest.mark.parametrize("command", ["train", "ablate", "probe"])
def test_command_line_defaults_are_the_configs_defaults_and_every_option_reaches_them(command):
    from training.__main__ import build_parser, configs

    args = build_parser().parse_args([command, "--data", "somewhere"])
    cfg, model_cfg = configs(args)
    assert model_cfg == ModelConfig()
    expected = TrainConfig(data="somewhere", preprocess=Preprocess())
    assert replace(cfg, out=expected.out) == expected
    # an option whose name is no config field would be dropped silently by configs()
    field_names = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(ModelConfig)}
    handled_elsewhere = {"command", "config", "recipe", "no_pretrained", "no_validate", "resume", "variants", "seeds",
                         "checkpoint"}  # fmt: skip
    assert set(vars(args)) - field_names <= handled_elsewhere


def test_command_line_reports_bad_input_in_one_line_and_exits_non_zero(tmp_path, capsys):
    from training.__main__ import main

    missing = tmp_path / "nowhere" / "labels.csv"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "run")]) == Exit.FATAL
    assert capsys.readouterr().err.strip() == f"error: {missing}: cannot read label file (No such file or directory)"
    assert main(["probe", "--data", str(missing), "--checkpoint", str(tmp_path / "none.pt")]) == Exit.FATAL
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.pt'}: no such checkpoint file"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(missing), "--dim", "999"])
    assert exit_info.value.code == 2 and "descriptor dimension must be 1..512" in capsys.readouterr().err


def test_linear_probe_finds_a_grade_written_into_the_features_and_nothing_in_noise():
    rng = np.random.default_rng(0)
    grades = rng.integers(0, 5, 1000)
    noise = rng.normal(size=(1000, 16))
    signal = noise.copy()
    signal[:, 3] += 1.5 * grades  # one feature carries the grade
    fit, held_out = slice(0, 700), slice(700, None)
    for features, low, high in ((signal, 0.95, 1.0), (noise, 0.35, 0.65)):
        logp = linear_probe(features[fit], grades[fit], features[held_out], 5)
        score, truth = logp[:, 2] - logp[:, 0], grades[held_out]
        assert low <= auc(score[truth == 2], score[truth == 0]) <= high
    assert auc(np.array([1.0, 2.0]), np.array([1.0])) == 0.75  # a tie counts half


def test_probe_of_a_checkpoint_reuses_its_training_cache_and_reports_every_grade(tiny_run, tiny_data, tmp_path, capsys):
    from training.__main__ import main

    cfg, best = tiny_run
    cache = Path(cfg.cache_dir)
    before = sorted(cache.rglob("*"))
    assert main(["probe", "--data", str(tiny_data), "--checkpoint", str(best), "--cache-dir", str(cache)]) == 0
    assert sorted(cache.rglob("*")) == before  # the run's own trunk maps, not recomputed ones
    out = capsys.readouterr().out
    table = out[out.index("grade  queries") :].splitlines()[2:7]  # under the header and its rule
    assert [int(row.split()[0]) for row in table] == [0, 1, 2, 3, 4]
    with open(tiny_data, newline="") as f:
        tests = sum(row["split"] == "test" for row in csv.DictReader(f))
    assert sum(int(row.split()[1]) for row in table) == tests  # every test photo, none twice
    assert all(0 <= float(row.split()[3]) <= 1 for row in table[1:])
    assert main(["probe", "--data", str(tiny_data), "--input-size", "128", "--cache-dir", str(tmp_path)]) == 0
    assert "(ImageNet, untrained)" in capsys.readouterr().out  # no checkpoint: the untrained backbone


@pytest.fixture(scope="module")
def whole_run(tiny_data, tmp_path_factory):
    """The whole network trained (nothing frozen) on photos in memory, with the ordinal term."""
    root = tmp_path_factory.mktemp("whole")
    cfg = replace(tiny_config(tiny_data, root / "w", root / "cache", ordinal_weight=1.0), epochs=2, batches_per_epoch=3)
    return cfg, train(cfg, ModelConfig(dim=32, input_size=96, frozen_blocks=0))


def test_whole_network_training_updates_the_stem_and_writes_a_full_checkpoint(whole_run):
    cfg, best = whole_run
    ckpt = load_checkpoint(best)
    start = FundusNet(ckpt.config, pretrained=True).state_dict()
    assert not torch.equal(ckpt.state["model"]["backbone.conv_stem.weight"], start["backbone.conv_stem.weight"])
    assert ckpt.state["train_config"]["ordinal_weight"] == 1.0 and ckpt.preprocess.size == 96
    assert set(ckpt.state["test"]["per_grade"]["mHR"]) == {0, 1, 2, 3, 4}
    log = (Path(cfg.out) / "log.txt").read_text()
    assert "(in memory)" in log and "broken.jpg" in log
    assert not list(Path(cfg.cache_dir).glob("*"))  # no trunk cache for the whole network


def test_init_fine_tunes_from_a_checkpoint(whole_run, tmp_path):
    cfg, best = whole_run
    tuned = train(replace(cfg, out=str(tmp_path / "t"), init=str(best), epochs=1), load_checkpoint(best).config)
    assert "initialised from" in (tmp_path / "t" / "log.txt").read_text()
    assert load_checkpoint(tuned).state["train_config"]["init"] == str(best)


def test_init_from_a_model_of_another_scale_keeps_everything_but_the_grade_head(whole_run):
    _, best = whole_run
    ckpt = load_checkpoint(best)
    net = FundusNet(replace(ckpt.config, num_classes=3), pretrained=False)
    head = net.classifier.weight.detach().clone()
    ckpt.load_weights_into(net)
    assert torch.equal(net.classifier.weight, head)  # 3 classes here, 5 in the checkpoint: left as initialised
    assert torch.equal(net.state_dict()["backbone.conv_stem.weight"], ckpt.state["model"]["backbone.conv_stem.weight"])


def test_a_teacher_keeps_a_fine_tuned_descriptor_near_its_own(whole_run, tiny_data, tmp_path):
    cfg, best = whole_run
    ckpt = load_checkpoint(best)
    masked = replace(ckpt.config, attention_mask="fov")  # the change a teacher is for: what the attention pools moves
    tuned = {}
    for weight in (0.0, 50.0):
        run = replace(cfg, out=str(tmp_path / f"w{weight:g}"), init=str(best), teacher=str(best), teacher_weight=weight, epochs=1)
        tuned[weight] = load_checkpoint(train(run, masked)).network()
    assert "kept near the descriptors of" in (tmp_path / "w50" / "log.txt").read_text()
    pp = ckpt.preprocess
    x = torch.from_numpy(np.stack([pp(p) for p, _ in eyepacs_sample(8, split="test")]))
    teacher = ckpt.network()
    with torch.no_grad():
        target = teacher(teacher.normalise(x))
        near = {w: float((net(net.normalise(x)) * target).sum(1).mean()) for w, net in tuned.items()}
    assert near[50.0] > near[0.0] + 0.1  # measured: 0.94 against 0.60


@pytest.mark.parametrize("model, message", [
    (ModelConfig(dim=32, input_size=128, frozen_blocks=0), "cannot teach this model"),  # another input size
    (ModelConfig(dim=32, input_size=96, frozen_blocks=4), "needs --frozen-blocks 0"),  # trains on the cached trunk
])  # fmt: skip
def test_a_teacher_that_cannot_teach_the_model_is_refused_naming_it(whole_run, tmp_path, model, message):
    cfg, best = whole_run
    with pytest.raises(CheckpointError, match=message) as refused:
        train(replace(cfg, out=str(tmp_path / "t"), teacher=str(best)), model)
    assert str(best) in str(refused.value)


def test_evaluate_reports_the_patient_split_and_the_papers_image_split(whole_run, tiny_data, capsys):
    from training.__main__ import main

    _, best = whole_run
    assert main(["evaluate", "--data", str(tiny_data), "--checkpoint", str(best)]) == Exit.OK
    out = capsys.readouterr().out
    assert "patient split" in out and "image split" in out
    reports = evaluate(embed_members(TrainConfig(data=str(tiny_data)), [str(best)]))
    with open(tiny_data, newline="") as f:
        rows = [r for r in csv.DictReader(f) if "broken" not in r["image"]]
    [patient] = reports["patient"].values()  # one source
    assert patient["n_queries"] == sum(r["split"] == "test" for r in rows)
    assert reports["image"]["n_queries"] == round(0.2 * len(rows))  # a fifth of the readable photos
    assert patient["micro"]["mHR"] == pytest.approx(load_checkpoint(best).state["test"]["micro"]["mHR"])


def perturbed_copy(checkpoint: Path, out: Path) -> Path:
    """The checkpoint with noise added to its convolution weights: a second, different member."""
    state = load_checkpoint(checkpoint).state
    g = torch.Generator().manual_seed(0)
    state["model"] = {k: v + 0.1 * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 4 else v
                      for k, v in state["model"].items()}  # fmt: skip
    save_checkpoint(out, state)
    return out


def test_an_ensembles_weights_are_swept_on_validation_with_its_members_alone_at_the_ends(whole_run, tiny_data, tmp_path):
    _, best = whole_run
    other = perturbed_copy(best, tmp_path / "other.pt")
    cfg = TrainConfig(data=str(tiny_data))
    pair = embed_members(cfg, [str(best), str(other)], validation=True)
    assert set(pair.split) == {0, 1}  # the test split is not even embedded
    assert not np.allclose(pair.vectors[0], pair.vectors[1], atol=1e-3)
    sweep = dict(sweep_weights(pair))
    assert len(sweep) == 11
    [first_alone] = sweep[(1.0, 0.0)].values()  # one source: one report
    recorded = load_checkpoint(best).state["validation"]  # what training measured at the chosen epoch
    assert first_alone["micro"]["mHR"] == pytest.approx(recorded["micro"]["mHR"])
    assert first_alone["macro"]["mHR"] == pytest.approx(recorded["macro"]["mHR"])
    whole = embed_members(cfg, [str(best), str(other)])
    [alone] = evaluate(embed_members(cfg, [str(other)]))["patient"].values()
    [second_alone] = evaluate(whole, [0.0, 1.0])["patient"].values()
    assert second_alone["micro"] == pytest.approx(alone["micro"])
    with pytest.raises(ValueError, match="validation photos"):  # each protocol refuses the other's embedding
        sweep_weights(whole)
    with pytest.raises(ValueError, match="validation photos only"):
        evaluate(pair)
    [twice] = evaluate(embed_members(cfg, [str(other), str(other)]), [0.3, 0.7])["patient"].values()  # the same cosines
    assert twice["micro"] == pytest.approx(alone["micro"]) and twice["macro"] == pytest.approx(alone["macro"])


def test_evaluate_ensembles_from_the_command_line_and_refuses_members_that_do_not_fit(whole_run, tiny_run, tiny_data, tmp_path, capsys):
    from training.__main__ import main

    _, best = whole_run
    other = perturbed_copy(best, tmp_path / "other.pt")
    data = ["--data", str(tiny_data)]
    assert main(["evaluate", *data, "--checkpoint", str(best), str(other), "--sweep"]) == Exit.OK
    out = capsys.readouterr().out
    assert "validation" in out and "0.6 : 0.4" in out and "highest micro + macro: --weights" in out
    assert "patient split" not in out  # the sweep leaves the test split unread
    assert main(["evaluate", *data, "--checkpoint", str(best), str(other), "--weights", "0.6", "0.4"]) == Exit.OK
    assert "patient split" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["evaluate", *data, "--checkpoint", str(best), str(other), "--weights", "1"])
    assert usage.value.code == Exit.USAGE and "2 checkpoints" in capsys.readouterr().err
    _, other_size = tiny_run  # 128 px against 96
    assert main(["evaluate", *data, "--checkpoint", str(best), str(other_size)]) == Exit.FATAL
    err = capsys.readouterr().err
    assert str(other_size) in err and "preprocessing differs" in err


def test_ordinal_loss_costs_more_the_further_the_mass_from_the_grade():
    grades = torch.tensor([0])
    near = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0]])  # mass on grade 1
    far = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0]])  # mass on grade 4
    assert ordinal_loss(far, grades) > ordinal_loss(near, grades) > ordinal_loss(torch.tensor([[5.0, 0, 0, 0, 0]]), grades)


def test_a_run_takes_a_toml_config_flags_win_and_the_run_records_it(tmp_path, capsys):
    from training.__main__ import build_parser, config_flags, record_options

    config = tmp_path / "run.toml"
    config.write_text(f'data = "{tmp_path}"\nfrozen_blocks = 0\nepochs = 3\nresume = true\nbackbone_lr = 5e-5\n')
    parser = build_parser()
    args = parser.parse_args(config_flags(parser, ["train", "--config", str(config), "--epochs", "5", "--out", str(tmp_path / "r")]))
    assert (args.frozen_blocks, args.epochs, args.resume, args.backbone_lr) == (0, 5, True, 5e-5)
    record_options(args)
    again = parser.parse_args(config_flags(parser, ["train", "--config", str(tmp_path / "r" / "run.toml")]))
    assert {k: v for k, v in vars(again).items() if k != "config"} == {k: v for k, v in vars(args).items() if k != "config"}
    config.write_text("frozen_blokcs = 0\n")
    with pytest.raises(SystemExit) as exit_info:
        config_flags(parser, ["train", "--config", str(config)])
    assert exit_info.value.code == Exit.USAGE and "unknown option 'frozen_blokcs' for train" in capsys.readouterr().err


def test_a_named_scale_declared_with_the_run_reaches_the_model_the_index_and_evaluate(tiny_data, tmp_path):
    """Three named classes instead of ICDR: read from label cells, one grade-head class each,
    recorded in the checkpoint and the exported model, enforced by the index, used by evaluate."""
    from click.testing import CliRunner

    from export import export_checkpoint
    from fundus_sdk import Index, Model, Scale
    from fundus_sdk.cli import main as cli

    names = ("none", "moderate", "severe")
    with open(tiny_data, newline="") as f:
        rows = [r | {"grade": names[(int(r["grade"]) + 1) // 2]} for r in csv.DictReader(f)]  # 0 | 1-2 | 3-4
    data = write_csv(tmp_path / "labels.csv", rows, ["image", "grade", "patient", "split"])
    with pytest.raises(LabelError, match=r"row 2 .*grade 'none' is not a whole number"):
        read_labels(data)  # on ICDR the names mean nothing
    cfg = replace(tiny_config(data, tmp_path / "run", tmp_path / "cache", labels=",".join(names)), epochs=1, batches_per_epoch=2)
    best = load_checkpoint(train(cfg, ModelConfig(dim=32, input_size=96, frozen_blocks=0, num_classes=3)))
    assert best.scale == Scale(0, 2, names) and best.state["model"]["classifier.weight"].shape[0] == 3
    assert set(best.state["test"]["per_grade"]["mHR"]) <= {0, 1, 2} and best.state["data"]["train"]["scale"] == ",".join(names)
    onnx = tmp_path / "three.onnx"
    export_checkpoint(best.path, onnx, verify_images=[Path(r["image"]) for r in rows[:2]], version="0.0.1")
    model = Model.load(onnx)
    assert model.scale == Scale(0, 2, names)
    with Index.create(tmp_path / "cases", model=model) as ix:
        assert ix.scale == model.scale
        vectors = model.embed([r["image"] for r in rows[:12]])
        ix.add(vectors, [{"grade": names.index(r["grade"])} for r in rows[:12]], model_fingerprint=model.fingerprint)
        with pytest.raises(ValueError, match="grade must be an integer of the scale none,moderate,severe, got 3"):
            ix.add(vectors[:1], [{"grade": 3}], model_fingerprint=model.fingerprint)
    queries = write_csv(tmp_path / "queries.csv", [{"image": r["image"], "grade": r["grade"]} for r in rows[12:20]], ["image", "grade"])
    result = CliRunner().invoke(cli, ["evaluate", "--index", str(tmp_path / "cases"), "--queries", str(queries),
                                      "--model", str(onnx), "-k", "3", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["grades"]) <= {0, 1, 2} and report["n_queries"] == 8
    assert 0 <= report["micro"]["NDCG"] <= 1  # gains over the span of 2, not ICDR's 4


def test_every_kept_checkpoint_loads_builds_its_network_and_is_listed():
    folder = Path(__file__).parents[1] / "checkpoints"
    listed = (folder / "README.md").read_text()
    for path in sorted(folder.glob("*.pt")):
        ckpt = load_checkpoint(path)
        assert f"`{path.name}`" in listed, f"{path.name} is not described in checkpoints/README.md"
        assert "optimizer" not in ckpt.state, f"{path.name}: keep weights only"
        net = ckpt.network()
        validation = ckpt.state["validation"]
        reports = [validation] if "micro" in validation else list(validation.values())  # one source, or one per source
        assert sum(p.numel() for p in net.parameters()) > 0 and reports and all(r["micro"]["mHR"] > 0 for r in reports)


def cells_wholly_inside(fov: np.ndarray, side: int) -> np.ndarray:
    cell = fov.shape[-1] // side
    return fov.reshape(len(fov), side, cell, side, cell).all(axis=(2, 4)).reshape(len(fov), -1)


def test_the_fov_mask_keeps_the_attention_on_cells_wholly_inside_the_field_of_view():
    pp = Preprocess()
    prepared = [pp.prepare(pp.decode(p)) for p, _ in eyepacs_sample(4)]
    images = torch.from_numpy(np.stack([p.pixels for p in prepared]))
    inside = torch.from_numpy(cells_wholly_inside(np.stack([p.fov for p in prepared]), 8))
    shares = {}
    for mask in ("none", "fov"):
        torch.manual_seed(0)
        net = FundusNet(ModelConfig(input_size=256, frozen_blocks=0, attention_mask=mask), pretrained=True).eval()
        with torch.no_grad():
            maps = net.attention_map(net.normalise(images)).flatten(1)
        torch.testing.assert_close(maps.sum(dim=1), torch.ones(len(maps)))
        shares[mask] = (maps * inside).sum(dim=1)
    assert shares["fov"].min() > 0.999 and shares["none"].max() < 0.99  # unmasked, the rim draws attention too
    with pytest.raises(ValueError, match="needs frozen_blocks=0"):
        ModelConfig(attention_mask="fov", frozen_blocks=4)


def test_weighted_sources_are_drawn_as_often_as_their_weight_says():
    labels = np.array([0] * 100 + [0] * 10)
    weights = np.array([1.0] * 100 + [3.0] * 10)
    drawn = np.concatenate(list(BalancedBatches(labels, 20, 60, seed=0, weights=weights)))
    second = (drawn >= 100).mean()
    assert abs(second - 30 / 130) < 0.03  # 10 photos x 3 against 100 x 1


@pytest.fixture(scope="module")
def second_source(tmp_path_factory) -> Path:
    """A small IDRiD label file: another camera, its own official split."""
    idrid = require_idrid()
    with open(idrid / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = [r for r in rows if r["split"] == "train"][:12] + [r for r in rows if r["split"] == "test"][:4]
    out = [{"image": str(idrid / "images" / r["image"]), "grade": r["grade"], "split": r["split"]} for r in chosen]
    return write_csv(tmp_path_factory.mktemp("idrid") / "labels.csv", out, ["image", "grade", "split"])


def test_a_sweep_over_two_sources_reports_each_on_its_own_and_chooses_on_their_mean(whole_run, tiny_data, second_source, tmp_path):
    _, best = whole_run
    other = perturbed_copy(best, tmp_path / "other.pt")
    pair = embed_members(TrainConfig(data=[str(tiny_data), str(second_source)]), [str(best), str(other)], validation=True)
    sweep = sweep_weights(pair)
    validation = pair.split == 1
    names = list(dict.fromkeys(pair.sources[validation]))
    assert len(names) == 2
    for _, reports in sweep:  # each source's queries apart, as training validates an epoch
        assert list(reports) == names
        assert [r["n_queries"] for r in reports.values()] == [int((validation & (pair.sources == n)).sum()) for n in names]
    means = {w: np.mean([r["micro"]["mHR"] + r["macro"]["mHR"] for r in reports.values()]) for w, reports in sweep}
    assert means[best_weights(sweep)] == max(means.values())


def test_two_sources_train_together_each_split_and_validated_on_its_own(tiny_data, second_source, tmp_path):
    cfg = replace(tiny_config(tiny_data, tmp_path / "two", tmp_path / "cache"), data=[str(tiny_data), str(second_source)],
                  source_weights=[1.0, 3.0], epochs=2, batches_per_epoch=2, val_fraction=0.25)  # fmt: skip
    fit, val, test = split_records(cfg)
    names = {r.source for r in fit}
    assert len(names) == 2 and {r.source for r in val} == names
    second = [n for n in names if n != tiny_data.parent.name][0]
    assert sum(r.source == second for r in test) == 4 and all(r.split == "train" for r in fit + val)
    assert not {r.patient for r in fit} & {r.patient for r in val}
    best = train(cfg, ModelConfig(dim=32, input_size=96, frozen_blocks=0, attention_mask="fov"))
    ckpt = load_checkpoint(best)
    assert set(ckpt.state["test"]) == names  # test figures per source
    tests = evaluate(embed_members(cfg, [str(best)]))["patient"]  # the same photos, re-measured
    assert {n: r["micro"]["mHR"] for n, r in tests.items()} == pytest.approx({n: r["micro"]["mHR"] for n, r in ckpt.state["test"].items()})
    log = (tmp_path / "two" / "log.txt").read_text()
    assert all(f"val {n} mHR@k" in log for n in names)
    assert ckpt.config.attention_mask == "fov" and ckpt.state["train_config"]["source_weights"] == [1.0, 3.0]
