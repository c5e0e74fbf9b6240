"""Imaging results a clinician can use (issue 10): lesion patches and film-level scores,
validation splits, operating thresholds, external validation, intensity standardisation.

Everything runs on the real data in ../shared/data (conftest.shared_data).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_app.config import compose_config
from fl_app.threshold import choose_threshold, parse_rule, rates_at
from tasks import SiteRef, get_task
from tasks.chest_xray import SPEC as CHEST
from tasks.image_task import preprocess, simulated_parts
from tasks.image_transforms import prepare_images
from tasks.patches import breast_mask, extract_patches, sliding_centres, windows
from tasks.score_groups import score_metrics

REPO = Path(__file__).resolve().parents[1]
PATCH_VIEW = ("task=mammography task.dataset=mias512 task.view=patch partition=iid "
              "partition.num_sites=3")


def _mias(shared_data: Path, extra: str = "") -> object:
    return compose_config(f"{PATCH_VIEW} task.data_dir={shared_data / 'mammography'} {extra}")


def _kermany(shared_data: Path, extra: str = "") -> object:
    return compose_config(
        f"task=chest_xray task.data_dir={shared_data / 'chest_xray'} task.dataset=kermany64 "
        f"partition=dirichlet partition.alpha=0.5 partition.num_sites=5 {extra}"
    )


# --------------------------------------------------------------------------- patches


def test_breast_mask_and_windows_on_a_real_film(shared_data: Path) -> None:
    """The breast is the one large bright region (not background, not the label marker);
    normal windows lie inside it and away from the lesion; lesion windows are centred."""
    from tasks.patches import Lesion, normal_centres

    films = np.load(shared_data / "mammography" / "mias_512.npz")["test_images"]
    film = films[0]  # mdb001: benign circumscribed mass at x=535, y=425, radius 197 (1024 px)
    mask = breast_mask(film)
    assert 0.15 < mask.mean() < 0.7
    assert film[mask].mean() > 100 and film[~mask].mean() < 20
    lesion = Lesion((1024 - 425) / 2, 535 / 2, 197 / 2, 1)
    centres = normal_centres(mask, [lesion], 50, 64, np.random.default_rng(0))
    assert len(centres) == 50 and mask[centres[:, 0], centres[:, 1]].all()
    reach = 32 + lesion.radius
    assert ((np.abs(centres[:, 0] - lesion.row) >= reach)
            | (np.abs(centres[:, 1] - lesion.col) >= reach)).all()
    cut = extract_patches(films[:1], [[lesion]], 64, 4, 3, 6.0, seed=0)
    assert list(cut.kinds) == ["lesion"] * 3 + ["normal"] * 4
    assert np.array_equal(cut.images[0], windows(film, np.array([[300, 268]]), 64)[0])
    assert cut.images[0][32, 32] == film[300, 268]
    grid = sliding_centres(mask, 64, 16)
    assert len(grid) > 100 and mask[grid[:, 0], grid[:, 1]].all()


def test_extract_patches_script_on_original_films(shared_data: Path, tmp_path: Path) -> None:
    """A hospital's command on the three original 1024 px films + an annotations CSV in
    mini-MIAS's own coordinates gives the task's windows of the 512 px file (+-1 grey level)."""
    samples = shared_data / "mammography" / "samples"
    (tmp_path / "annotations.csv").write_text(
        "image,x,y,radius,label,patient_id,split\n"
        f"{samples / 'mdb001.png'},535,425,197,benign,P001,test\n"
        f"{samples / 'mdb003.pgm'},,,,normal,P002,train\n"
        f"{samples / 'mdb023.png'},538,681,29,malignant,P012,train\n"
    )
    out = tmp_path / "patches.npz"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "extract_patches.py"),
         str(tmp_path / "annotations.csv"), "--output", str(out), "--film-size", "512",
         "--origin", "bottom-left", "--size", "64", "--eval-lesion-copies", "2",
         "--val-fraction", "0"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    data = np.load(out)
    assert data["train_images"].shape[1:] == (64, 64)
    assert sorted(set(data["train_labels"][:, 0].tolist())) == [0, 2]
    assert data["test_labels"][:, 0].tolist()[:2] == [1, 1]
    film = np.load(shared_data / "mammography" / "mias_512.npz")["test_images"][0]
    expected = windows(film, np.array([[300, 268]]), 64)[0].astype(int)
    assert np.abs(data["test_images"][0].astype(int) - expected).max() <= 1
    meta = (tmp_path / "patches_metadata.csv").read_text().splitlines()
    assert meta[0].startswith("split,index_in_split,image,patient_id,kind")
    # a bad CSV is one clear line and exit status 2
    (tmp_path / "bad.csv").write_text("image,x,label\nmdb001.png,1,benign\n")
    bad = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "extract_patches.py"), str(tmp_path / "bad.csv"),
         "--output", str(tmp_path / "bad.npz")],
        capture_output=True, text=True, check=False, cwd=REPO,
    )
    assert bad.returncode == 2 and "missing column(s) y, radius" in bad.stderr
    assert "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- validation splits


@pytest.mark.parametrize("which", ["kermany64", "mias_film", "mias_patch"])
def test_every_imaging_site_has_a_patient_disjoint_validation_split(
    shared_data: Path, which: str
) -> None:
    """Each site's val patients are disjoint from its own and every other site's train and
    test patients (the official val split, dealt like test)."""
    cfg = {
        "kermany64": lambda: _kermany(shared_data),
        "mias_film": lambda: compose_config(
            f"task=mammography task.data_dir={shared_data / 'mammography'} partition=iid "
            "partition.num_sites=3"),
        "mias_patch": lambda: _mias(shared_data),
    }[which]()
    task = get_task(str(cfg.task.name))
    sites = [task.load_site(cfg, SiteRef(name, index=i))
             for i, name in enumerate(task.site_names(cfg))]
    owner: dict[tuple[str, str], str] = {}
    for site in sites:
        assert site.val is not None and len(site.val) > 0
        patients = site.extras["patients"]
        assert all(patients[s] is not None for s in ("train", "val", "test"))
        val = set(patients["val"])
        assert not val & set(patients["train"]) and not val & set(patients["test"])
        for split in ("train", "val", "test"):
            for patient in set(patients[split]):
                # one site, and the same split, per patient (train/test carry prefixes)
                assert owner.setdefault(("p", patient), f"{site.name}/{split}") == \
                    f"{site.name}/{split}"
    if which == "kermany64":
        assert sum(len(s.val) for s in sites) == 497  # the official val split, all of it
    if which == "mias_film":
        assert sum(len(s.val) for s in sites) == 32


# --------------------------------------------------------------------------- thresholds


def test_threshold_rules_from_score_groups(shared_data: Path) -> None:
    """Rules chosen from k-patient score groups (what sites send) land where the exact
    per-patient rates say they should."""
    data = np.load(shared_data / "chest_xray" / "pneumoniamnist.npz")
    # a transparent real score: the mean brightness of the validation images
    score = data["val_images"].reshape(len(data["val_images"]), -1).mean(1) / 25.5
    labels = data["val_labels"][:, 0]
    half = len(labels) // 2  # two "sites"
    sites = [score_metrics(labels[part], score[part]) for part in (slice(None, half),
                                                                  slice(half, None))]
    t = choose_threshold(parse_rule("sensitivity:0.95"), sites)
    assert rates_at(labels, score, t)["sensitivity"] >= 0.93
    youden = choose_threshold(parse_rule("youden"), sites)
    j = [rates_at(labels, score, c) for c in np.unique(score)]
    best_j = max(r["sensitivity"] + r["specificity"] for r in j)
    chosen = rates_at(labels, score, youden)
    assert chosen["sensitivity"] + chosen["specificity"] >= best_j - 0.05
    assert choose_threshold(parse_rule("0.5"), None) == 0.0  # logit of 0.5
    assert parse_rule("0.3").value == 0.3
    for bad in ("sensitivity:1.5", "median", "2"):
        with pytest.raises(ValueError, match=r"task\.threshold"):
            parse_rule(bad)


# --------------------------------------------------------------------------- intensity


def test_intensity_standardisation_is_per_image(shared_data: Path) -> None:
    images = np.load(shared_data / "chest_xray" / "pneumoniamnist.npz")["test_images"][:8]
    normal = prepare_images(images, None, "normalize")
    assert torch.allclose(normal.mean(dim=(1, 2, 3)), torch.zeros(8), atol=1e-5)
    assert torch.allclose(normal.std(dim=(1, 2, 3)), torch.ones(8), atol=1e-2)
    # per image: one image alone gets exactly what it gets inside a batch
    assert torch.allclose(prepare_images(images[3:4], None, "histeq"),
                          prepare_images(images, None, "histeq")[3:4])
    darker = (images * 0.5).astype(np.uint8)
    assert torch.allclose(prepare_images(darker, None, "normalize"), normal, atol=0.05)
    with pytest.raises(ValueError, match=r"task\.intensity"):
        prepare_images(images, None, "zscore")


# --------------------------------------------------------------------------- end to end


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_mammography_patch_view_federated_beats_intensity_and_scores_films(
    shared_data: Path, tmp_path: Path
) -> None:
    """3 hospitals, patient-level mini-MIAS, lesion vs normal-tissue patches: pooled patch AUC
    >= 0.80 and above the mean-intensity baseline; a film-level AUC over all 64 test films."""
    from fl_app.simulation import simulate

    cfg = compose_config(f"experiment=mammography_patches task.data_dir="
                         f"{shared_data / 'mammography'} num_rounds=3 output_dir={tmp_path}")
    run = simulate(cfg, num_cpus=2).path
    pooled = _summary(run)["pooled"]
    assert pooled["auc"] >= 0.80, pooled
    assert pooled["auc"] > max(pooled["intensity_auc"], 1 - pooled["intensity_auc"]), pooled
    assert pooled["film-num-examples"] == 64 and 0.0 <= pooled["film_auc"] <= 1.0
    per_site = _summary(run)["per_site"]
    assert all("film_auc" in m and "intensity_auc" in m for m in per_site.values())


def test_chest_threshold_sensitivity_095(shared_data: Path, tmp_path: Path) -> None:
    """task.threshold=sensitivity:0.95, chosen federatedly from the validation score groups:
    pooled test sensitivity >= 0.93, the threshold in summary.json."""
    from fl_app.simulation import simulate

    cfg = compose_config(
        f"task=chest_xray task.data_dir={shared_data / 'chest_xray'} partition=iid "
        f"partition.num_sites=3 num_rounds=2 output_dir={tmp_path} "
        "task.threshold=sensitivity:0.95"
    )
    summary = _summary(simulate(cfg, num_cpus=2).path)
    assert summary["threshold_rule"] == "sensitivity:0.95"
    assert 0.0 < summary["threshold"] < 1.0
    assert summary["threshold"] == pytest.approx(1 / (1 + np.exp(-summary["threshold_logit"])))
    assert summary["pooled"]["sensitivity"] >= 0.93, summary["pooled"]
    assert all(m["threshold-logit"] == summary["threshold_logit"]
               for m in summary["per_site"].values())


def _evaluate(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl_app.evaluate", *map(str, args)],
                          capture_output=True, text=True, check=False, cwd=REPO)


def test_kermany_youden_run_and_external_validation(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kermany64, 5 hospitals: youden's pooled accuracy is within 3 points of the best over
    all thresholds; fl_app.evaluate on the run's own test data gives the run's AUC (1e-6 on a
    site's share, the pooled one to histogram precision) and refuses wrong data clearly."""
    from fl_app.evaluate import evaluate_external
    from fl_app.evaluate import main as evaluate_main
    from fl_app.simulation import simulate

    cfg = _kermany(shared_data, f"num_rounds=2 output_dir={tmp_path} task.threshold=youden")
    run = simulate(cfg, num_cpus=2).path
    summary = _summary(run)
    pooled = summary["pooled"]
    # best accuracy over all thresholds, from the final model on the whole test split
    task = get_task("chest_xray")
    info = json.loads((run / "sites.json").read_text())["model_info"]
    model = task.build_model(cfg, info)
    model.load_state_dict(torch.load(run / "final_model.pt"))
    test = np.load(shared_data / "chest_xray" / "kermany_cxr_64.npz")
    with torch.no_grad():
        probs = torch.softmax(model(preprocess(test["test_images"], cfg)), 1)[:, 1].numpy()
    labels = test["test_labels"][:, 0]
    best = max(((probs >= t) == labels).mean() for t in np.unique(probs))
    assert pooled["accuracy"] >= best - 0.03, (pooled, best)
    # external validation on site-0's own test share: the run's per-site AUC to 1e-6
    sim = simulated_parts(CHEST, cfg)
    share = sim.parts["test"][0]
    own = tmp_path / "site0_test.npz"
    np.savez(own, train_images=test["test_images"][:0], train_labels=test["test_labels"][:0],
             val_images=test["test_images"][:0], val_labels=test["test_labels"][:0],
             test_images=test["test_images"][share], test_labels=test["test_labels"][share])
    done = _evaluate(run, own)
    assert done.returncode == 0, done.stderr
    report = json.loads((run / "external" / "site0_test.json").read_text())
    site0 = summary["per_site"]["site-0"]
    assert report["auc"] == pytest.approx(site0["auc"], abs=1e-6)
    assert report["threshold_logit"] == summary["threshold_logit"]
    for key in ("accuracy", "sensitivity", "specificity"):
        assert report[key] == pytest.approx(site0[key], abs=1e-6), key
    assert report["auc_ci95"][0] < report["auc"] < report["auc_ci95"][1]
    assert 0.0 <= report["ece"] <= 1.0 and (run / report["reliability_png"]).is_file()
    assert "AUC" in done.stdout and "95% CI" in done.stdout
    text = (run / "report.md").read_text()  # the run report gains the external validation
    assert "## External validation" in text and f"| site0_test | {report['num-examples']} |" \
        in text and f"]({report['reliability_png']})" in text
    assert f"at least **{summary['threshold']:.3f}**" in text  # the youden threshold
    report = evaluate_external(run, shared_data / "chest_xray" / "kermany_cxr_64.npz", "test")
    assert report["num-examples"] == 624
    assert report["auc"] == pytest.approx(pooled["auc"], abs=2e-3)
    # wrong size and wrong task: exit 2, one line, no traceback
    capsys.readouterr()  # drop the run's own log
    for data, message in ((shared_data / "chest_xray" / "pneumoniamnist.npz", "trained on 64x64"),
                          (shared_data / "mammography" / "mias_128.npz", "labels [2]")):
        assert evaluate_main([str(run), str(data)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
