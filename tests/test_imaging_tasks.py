"""Imaging tasks (chest_xray, mammography): models, transforms, sites, end-to-end runs.

Everything runs on the real data in ../shared/data (see conftest.shared_data).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from fl_app.config import compose_config
from tasks import DataError, SiteRef, get_task
from tasks.chest_xray import SPEC as CHEST
from tasks.image_models import build_image_model
from tasks.image_task import matched_split, simulated_parts
from tasks.image_transforms import ImageDataset, augmentation, prepare_images
from tasks.mammography import SPEC as MAMMO

PNEUMONIA_TEST = 624  # official PneumoniaMNIST / Kermany test split


def _cfg(**task: object) -> OmegaConf:
    return OmegaConf.create({"task": {"norm": "group", "cnn_widths": [8, 16], **task}})


def chest(shared_data: Path, extra: str = "") -> OmegaConf:
    return compose_config(
        f"task=chest_xray task.data_dir={shared_data / 'chest_xray'} partition=dirichlet "
        f"partition.alpha=0.5 partition.num_sites=5 {extra}"
    )


def mammo(shared_data: Path, extra: str = "") -> OmegaConf:
    return compose_config(
        f"task=mammography task.data_dir={shared_data / 'mammography'} partition=iid "
        f"partition.num_sites=3 {extra}"
    )


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(("model", "size"), [("cnn", 28), ("resnet18", 28), ("resnet18", 96),
                                             ("densenet_small", 64)])
def test_group_norm_models_are_opacus_ready(model: str, size: int) -> None:
    """Validator finds nothing to fix, and a DP-SGD step in Opacus hooks mode works."""
    net = build_image_model(_cfg(model=model), {"image_size": size, "num_classes": 2})
    assert ModuleValidator.validate(net, strict=False) == []
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    x = torch.rand(8, 1, size, size)
    assert net(x).shape == (8, 2)
    loader = DataLoader(TensorDataset(x, torch.tensor([0, 1] * 4)), batch_size=4)
    before = [p.detach().clone() for p in net.parameters()]
    engine = PrivacyEngine(accountant="rdp")
    dp_net, optimizer, dp_loader = engine.make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks",
    )
    for xb, yb in dp_loader:
        if len(yb) == 0:
            continue
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(dp_net(xb), yb).backward()
        optimizer.step()
    assert engine.get_epsilon(1e-5) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_batch_norm_variant_is_flagged_by_opacus() -> None:
    """norm=batch (FedBN's usual case) really uses BatchNorm, which DP-SGD cannot use."""
    net = build_image_model(_cfg(model="cnn", norm="batch"), {"image_size": 28})
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert ModuleValidator.validate(net, strict=False) != []


def test_densenet121_is_monai_with_group_norm() -> None:
    from monai.networks.nets import DenseNet121

    net = build_image_model(_cfg(model="densenet121"), {"image_size": 64})
    assert isinstance(net, DenseNet121)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules()) > 100
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_unknown_model_and_norm_are_named() -> None:
    with pytest.raises(ValueError, match=r"task\.model must be one of"):
        build_image_model(_cfg(model="vgg"), {"image_size": 28})
    with pytest.raises(ValueError, match=r"task\.norm must be one of"):
        build_image_model(_cfg(model="cnn", norm="layer"), {"image_size": 28})


# --------------------------------------------------------------------------- transforms


def test_prepare_images_scales_and_resizes(shared_data: Path) -> None:
    raw = np.load(shared_data / "mammography" / "mias_128.npz")["train_images"][:6]
    images = prepare_images(raw)
    assert images.shape == (6, 1, 128, 128) and images.dtype == torch.float32
    assert torch.allclose(images[:, 0], torch.from_numpy(raw.astype(np.float32) / 255.0))
    small = prepare_images(raw, 64)
    assert small.shape == (6, 1, 64, 64)
    # area resize by 2 is the exact 2x2 block mean
    block = raw.astype(np.float64).reshape(6, 64, 2, 64, 2).mean(axis=(2, 4)) / 255.0
    assert np.allclose(small[:, 0].numpy(), block, atol=1e-5)


def test_augmentation_is_seeded_and_changes_training_images(shared_data: Path) -> None:
    raw = np.load(shared_data / "mammography" / "mias_128.npz")["train_images"][:8]
    images = prepare_images(raw)
    aug = OmegaConf.create({"enabled": True, "flip_prob": 1.0, "rotate_prob": 0.0,
                            "zoom_prob": 0.0, "affine_prob": 0.0})
    flipped = ImageDataset(images, np.zeros(8), augmentation(aug, 128, seed=0))[3][0]
    assert torch.equal(flipped, torch.flip(images[3], dims=[-1]))  # left-right flip
    full = OmegaConf.create({"enabled": True, "flip_prob": 0.5, "rotate_prob": 0.5,
                             "rotate_deg": 15, "zoom_prob": 0.5, "affine_prob": 0.5,
                             "translate": 0.1})
    first = [ImageDataset(images, np.zeros(8), augmentation(full, 128, seed=7))[i][0]
             for i in range(8)]
    again = [ImageDataset(images, np.zeros(8), augmentation(full, 128, seed=7))[i][0]
             for i in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sum(not torch.equal(a, images[i]) for i, a in enumerate(first)) >= 4
    assert all(a.shape == (1, 128, 128) and type(a) is torch.Tensor for a in first)
    assert augmentation(OmegaConf.create({"enabled": False}), 128, 0) is None


# --------------------------------------------------------------------------- splitting


def test_matched_split_follows_reference_shares_and_keeps_groups() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 600)
    groups = np.repeat(np.arange(300), 2)  # two images per patient
    labels = np.repeat(labels[::2], 2)
    reference = [np.array([0] * 90 + [1] * 10), np.array([0] * 10 + [1] * 90),
                 np.array([1] * 50)]
    parts = matched_split(labels, reference, seed=3, groups=groups)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(600))  # disjoint and complete
    for a, b in zip(parts, matched_split(labels, reference, seed=3, groups=groups), strict=True):
        assert np.array_equal(a, b)
    zeros = (labels == 0).sum()
    assert (labels[parts[0]] == 0).sum() == pytest.approx(0.9 * zeros, abs=3)
    assert (labels[parts[2]] == 0).sum() == 0  # site 2 trains on no class-0 example
    site_of = {}
    for site, part in enumerate(parts):
        for g in groups[part]:
            assert site_of.setdefault(g, site) == site


def test_chest_sites_partition_train_and_cover_official_test(shared_data: Path) -> None:
    cfg = chest(shared_data)
    sim = simulated_parts(CHEST, cfg)
    train, test = sim.kept["train"], sim.kept["test"]
    train_parts, test_parts = sim.parts["train"], sim.parts["test"]
    assert len(train.labels) == 4708 and len(test.labels) == PNEUMONIA_TEST
    for parts, n in ((train_parts, 4708), (test_parts, PNEUMONIA_TEST)):
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    # label skew: sites' pneumonia fractions differ, and each site's test share follows it
    train_frac = [train.labels[p].mean() for p in train_parts]
    test_frac = [test.labels[p].mean() for p in test_parts]
    assert max(train_frac) - min(train_frac) > 0.3
    assert np.corrcoef(train_frac, test_frac)[0, 1] > 0.9
    site = get_task("chest_xray").load_site(cfg, SiteRef("site-1", index=1))
    assert len(site.train) == len(train_parts[1]) and len(site.test) == len(test_parts[1])
    assert site.info["image_size"] == 28 and site.info["in_channels"] == 1
    assert site.info["num_classes"] == 2
    x, y = site.train[0]
    assert x.shape == (1, 28, 28) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert y.dtype == torch.int64


def test_kermany_sites_are_patient_level(shared_data: Path) -> None:
    cfg = chest(shared_data, "task.dataset=kermany64")
    sim = simulated_parts(CHEST, cfg)
    splits, test = sim.splits, sim.kept["test"]
    train_parts, test_parts = sim.parts["train"], sim.parts["test"]
    assert splits.train_groups is not None and len(test.labels) == PNEUMONIA_TEST
    for groups, parts in ((splits.train_groups, train_parts), (splits.test_groups, test_parts)):
        owners = [set(groups[p]) for p in parts]
        assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])
    site = get_task("chest_xray").load_site(cfg, SiteRef("site-0", index=0))
    assert site.info["image_size"] == 64


def test_mammography_targets_and_patient_split(shared_data: Path) -> None:
    cfg = mammo(shared_data)
    sim = simulated_parts(MAMMO, cfg)
    splits, train, test = sim.splits, sim.kept["train"], sim.kept["test"]
    train_parts = sim.parts["train"]
    assert (len(train.labels), len(test.labels)) == (226, 64)
    assert train.labels.sum() == 80 and test.labels.sum() == 23  # benign + malignant films
    owners = [set(splits.train_groups[p]) for p in train_parts]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])
    assert sum(len(o) for o in owners) == 113  # all train patients, both films together
    cfg = mammo(shared_data, "task.target=malignancy")
    sim = simulated_parts(MAMMO, cfg)
    train, test = sim.kept["train"], sim.kept["test"]
    assert (len(train.labels), len(test.labels)) == (80, 23)
    assert train.labels.sum() == 37 and test.labels.sum() == 10  # malignant films
    site = get_task("mammography").load_site(cfg, SiteRef("site-2", index=2))
    assert site.info["classes"] == ["benign", "malignant"]
    assert site.info["target"] == "malignancy"


def test_mias256_and_image_size_override(shared_data: Path) -> None:
    cfg = mammo(shared_data, "task.dataset=mias256 task.image_size=96")
    site = get_task("mammography").load_site(cfg, SiteRef("site-0", index=0))
    assert site.train[0][0].shape == (1, 96, 96) and site.info["image_size"] == 96


# --------------------------------------------------------------------------- a hospital's data


def test_site_with_its_own_npz(shared_data: Path, tmp_path: Path) -> None:
    """Deployment: the SuperNode's data-path is the hospital's MedMNIST-layout npz."""
    source = np.load(shared_data / "chest_xray" / "pneumoniamnist_full_reconstructed.npz")
    own = tmp_path / "hospital.npz"
    np.savez(own, **{k: source[k][:40] for k in source.files})
    cfg = chest(shared_data)
    site = get_task("chest_xray").load_site(cfg, SiteRef("st-mary", data_path=own))
    assert (len(site.train), len(site.test)) == (40, 40)
    assert torch.equal(site.train.labels, torch.from_numpy(source["train_labels"][:40, 0]
                                                          .astype(np.int64)))


def test_site_with_its_own_folder_of_images(shared_data: Path, tmp_path: Path) -> None:
    """A folder with a manifest (path,label,patient_id,split) of real JPEG radiographs."""
    samples = sorted((shared_data / "chest_xray" / "samples").glob("*.jpeg"))
    rows = ["path,label,patient_id,split"]
    for i, path in enumerate(samples):
        label = "normal" if "NORMAL" in path.name else "pneumonia"
        rows.append(f"{path},{label},p{i},{'test' if i == 0 else 'train'}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = chest(shared_data, "task.dataset=folder task.image_size=64 "
                "task.classes=[normal,pneumonia]")
    site = get_task("chest_xray").load_site(cfg, SiteRef("own", data_path=tmp_path))
    assert (len(site.train), len(site.test)) == (len(samples) - 1, 1)
    assert site.train[0][0].shape == (1, 64, 64)
    assert site.test[0][1].item() == 0  # the NORMAL film


def test_bad_config_and_data_give_clear_errors(shared_data: Path, tmp_path: Path) -> None:
    task = get_task("chest_xray")
    with pytest.raises(DataError, match=r"task\.dataset 'mnist'.*pneumoniamnist, kermany64"):
        task.load_site(chest(shared_data, "task.dataset=mnist"), SiteRef("site-0", index=0))
    with pytest.raises(DataError, match=r"task\.data_dir is not set"):
        task.load_site(chest(shared_data, "task.data_dir=null"), SiteRef("site-0", index=0))
    source = np.load(shared_data / "chest_xray" / "pneumoniamnist_full_reconstructed.npz")
    bad = tmp_path / "three_classes.npz"
    arrays = {k: source[k][:20].copy() for k in source.files}
    arrays["train_labels"][3] = 2
    np.savez(bad, **arrays)
    with pytest.raises(DataError, match=r"three_classes\.npz \(train\): labels \[2\]"):
        task.load_site(chest(shared_data), SiteRef("x", data_path=bad))
    with pytest.raises(DataError, match=r"task\.target must be one of"):
        get_task("mammography").load_site(mammo(shared_data, "task.target=density"),
                                          SiteRef("site-0", index=0))


# --------------------------------------------------------------------------- end to end


def _run_files(run: Path, rounds: int) -> dict:
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final_model.pt",
                 "plots/metrics.png"):
        assert (run / name).is_file(), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == rounds
    summary = json.loads((run / "summary.json").read_text())
    assert {"pooled", "per_site", "mean_site_accuracy"} <= set(summary)
    return summary


def test_chest_xray_federated_five_hospitals_reaches_auc_090(shared_data: Path,
                                                             tmp_path: Path) -> None:
    """5 simulated hospitals, Dirichlet(0.5) label skew, a few FedAvg rounds: pooled AUC on
    the official 624-image PneumoniaMNIST test split >= 0.90."""
    from fl_app.simulation import simulate

    rounds = 3
    cfg = chest(shared_data, f"num_rounds={rounds} output_dir={tmp_path}")
    run = simulate(cfg, num_cpus=2)
    summary = _run_files(run.path, rounds)
    pooled = summary["pooled"]
    assert pooled["num-examples"] == PNEUMONIA_TEST
    assert sum(m["num-examples"] for m in summary["per_site"].values()) == PNEUMONIA_TEST
    assert sorted(summary["per_site"]) == [f"site-{i}" for i in range(5)]
    assert all("auc" in m for m in summary["per_site"].values())
    assert pooled["auc"] >= 0.90, pooled
    # the pooled AUC (from the sites' k-patient score groups) against scikit-learn on every
    # test film's score from the final model, re-evaluated here
    from sklearn.metrics import roc_auc_score

    from tasks import engine

    task = get_task("chest_xray")
    sites = [task.apply_statistics(task.load_site(cfg, SiteRef(f"site-{i}", index=i)), None)
             for i in range(5)]
    model = task.build_model(cfg, sites[0].info)
    model.load_state_dict(torch.load(run.path / "final_model.pt"))
    labels, scores = [], []
    for site in sites:
        y, _, _, z = engine.predict(model, engine.make_loader(site.test, 256, False, 0),
                                    torch.device("cpu"))
        labels.append(y)
        scores.append(z)
    exact = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    print(f"chest pooled AUC {pooled['auc']:.6f}, exact {exact:.6f}")
    assert abs(pooled["auc"] - exact) <= 1e-3


def test_mammography_federated_runs_on_mini_mias(shared_data: Path, tmp_path: Path) -> None:
    """3 simulated hospitals (patient-level split of mini-MIAS), MONAI DenseNet, 2 rounds.

    The AUC bar is only "defined over all 64 test films": whole 128 px films and 226 training
    films give test AUCs around (often below) chance for every model tried here, federated or
    centralized (see the closing note of issue 3); a higher bar would be a coin toss.
    """
    from fl_app.simulation import simulate

    cfg = mammo(shared_data, f"num_rounds=2 task.local_epochs=1 output_dir={tmp_path}")
    run = simulate(cfg, num_cpus=2)
    summary = _run_files(run.path, 2)
    pooled = summary["pooled"]
    assert pooled["num-examples"] == 64
    assert pooled["auc"] is not None and 0.0 <= pooled["auc"] <= 1.0
    assert all(m["auc"] is None or 0.0 <= m["auc"] <= 1.0 for m in summary["per_site"].values())
    sites = json.loads((run.path / "sites.json").read_text())["sites"]
    assert sum(s["num_train"] for s in sites) == 226


def test_mammography_films_face_one_way(shared_data: Path) -> None:
    """align_laterality flips exactly the right-breast films (113 of 226 train, 32 of 64 test)."""
    from tasks.image_task import load_splits

    raw = np.load(shared_data / "mammography" / "mias_128.npz")
    aligned = load_splits(MAMMO, mammo(shared_data))
    kept = load_splits(MAMMO, mammo(shared_data, "task.align_laterality=false"))
    assert np.array_equal(kept.train_images, raw["train_images"])
    flipped = [not np.array_equal(a, b) for a, b in zip(aligned.train_images,
                                                         raw["train_images"], strict=True)]
    assert sum(flipped) == 113
    assert sum(not np.array_equal(a, b) for a, b in zip(aligned.test_images, raw["test_images"],
                                                        strict=True)) == 32
    i = flipped.index(True)
    assert np.array_equal(aligned.train_images[i], raw["train_images"][i][:, ::-1])
    # every aligned film has its breast (the bright side) on the same half
    left = aligned.train_images[:, :, :64].mean(axis=(1, 2))
    right = aligned.train_images[:, :, 64:].mean(axis=(1, 2))
    assert (left > right).mean() > 0.95
