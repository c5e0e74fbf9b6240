"""Plain words for the run report: what a config choice means, for a reader who never saw
the code (fl_app/report.py puts them together)."""

from __future__ import annotations

from typing import Any

TASKS = {
    "heart_disease": ("Heart disease: angiographic coronary artery disease (UCI `num > 0`) "
                      "predicted from routine clinical measurements (age, sex, chest pain, "
                      "blood pressure, cholesterol, ECG, exercise test)", "heart disease"),
    "chest_xray": ("Pneumonia on paediatric chest X-rays (normal vs pneumonia, Kermany et "
                   "al. 2018)", "pneumonia"),
    "mammography": ("Mammography films (mini-MIAS): abnormal vs normal film, or malignant vs "
                    "benign, per `task.target`", "positive film"),
    "mammography_patches": ("Mammography patches (mini-MIAS): lesion patches vs normal tissue, "
                            "also scored per film", "lesion"),
    "breast_cancer": ("Breast cancer: malignant vs benign tumour from cell-nucleus "
                      "measurements of a fine-needle aspirate (Wisconsin diagnostic)",
                      "malignant"),
}

STRATEGIES = {
    "fedavg": "FedAvg (federated averaging): each round every hospital trains the shared model "
              "on its own patients and sends back only the model; the server averages the "
              "models, weighting each hospital by its number of training patients.",
    "fedprox": "FedProx: as FedAvg, with a penalty (mu = {proximal_mu}) that keeps each "
               "hospital's model close to the shared one, for hospitals whose patients differ.",
    "fedadam": "FedAdam: the server moves the shared model with an adaptive (Adam) step "
               "computed from the hospitals' average change (server learning rate {eta}).",
    "median": "Median: per model parameter the server takes the median over hospitals, so one "
              "hospital sending a broken or malicious model cannot drag the result.",
    "trimmed_mean": "Trimmed mean: per model parameter the highest and lowest {beta} of the "
                    "hospitals' values are dropped before averaging (robust to outliers).",
    "krum": "Krum: the server keeps the one hospital model closest to the others (tolerates "
            "{num_malicious_nodes} bad hospital(s)).",
    "multikrum": "Multi-Krum: the server averages the {num_nodes_to_select} hospital models "
                 "closest to the others (tolerates {num_malicious_nodes} bad hospital(s)).",
    "bulyan": "Bulyan: Krum selection followed by a trimmed mean (tolerates "
              "{num_malicious_nodes} bad hospital(s)).",
    "qfedavg": "q-FedAvg (fair federated averaging, q = {q}): hospitals where the shared model "
               "does worse (higher training loss) weigh more in each update, to narrow the gap "
               "between the best- and the worst-served hospital.",
    "centralized": "Centralized baseline: every hospital's training data pooled in one place "
                   "and trained as one data set. It is the yardstick federated learning is "
                   "compared with, not something a consortium can do without moving data.",
}

# task.dataset -> plain words (imaging tasks)
DATASETS = {
    "pneumoniamnist": "PneumoniaMNIST: the Kermany images reduced to 28x28 pixels, official "
                      "split",
    "kermany64": "Kermany images at 64x64 pixels, split by patient",
    "kermany128": "a subset of the Kermany images at 128x128 pixels, split by patient",
}

# task.protocol -> plain words (heart disease)
PROTOCOLS = {
    "flamby": "FLamby's Fed-Heart-Disease benchmark: its split and features",
    "flamby_sizes": "FLamby's site sizes with another split (seed 42) and all feature levels",
    "impute": "all 920 patients, missing values filled with the federated mean",
}

# tasks whose unit of data is an image (a patient may have several), not a patient record
IMAGE_TASKS = ("chest_xray", "mammography", "mammography_patches")

# summary.json privacy per_site status -> plain words
PRIVACY_STATUS = {
    "active": "budget left",
    "budget_exhausted": "stopped: one more round would exceed its budget",
    "excluded": "stopped: one more round would exceed its budget",
    "refused": "stopped: the request broke the hospital's own privacy limits",
    "rejected": "stopped: the server rejected its reply (inconsistent privacy report)",
}

PARTITIONS = {
    "natural": "each site is a real hospital with its own patients",
    "iid": "one data set split at random into {num_sites} simulated hospitals with the same "
           "mix of patients",
    "dirichlet": "one data set split into {num_sites} simulated hospitals with different mixes "
                 "of the classes (Dirichlet alpha = {alpha}; smaller = more different)",
    "quantity": "one data set split into {num_sites} simulated hospitals of different sizes",
}

SECURE_AGGREGATION = {
    "none": "Off: the coordinating server sees each hospital's model update.",
    "secaggplus": "SecAgg+ (Flower): hospitals mask their updates so that the server learns "
                  "only the sum over hospitals, never one hospital's update.",
    "ckks": "CKKS homomorphic encryption (TenSEAL): updates are encrypted at each hospital, "
            "added while encrypted, and only the sum is decrypted (by {decryptors} hospitals "
            "together); the server never sees one hospital's update.",
}

THRESHOLD_RULES = {
    "youden": "chosen on the hospitals' validation patients to maximise sensitivity + "
              "specificity, Youden's J",
    "sensitivity": "the highest threshold that keeps sensitivity at or above {value} on the "
                   "hospitals' validation patients (a screening setting)",
}


def task_words(name: str) -> tuple[str, str]:
    """(what the task predicts, the name of its positive class)."""
    return TASKS.get(name, (f"task `{name}`", "positive"))


def strategy_words(strategy: dict[str, Any]) -> str:
    """One sentence on how the hospitals' models are combined."""
    name = str(strategy.get("name"))
    text = STRATEGIES.get(name, f"`{name}`")
    try:
        return text.format(**strategy)
    except (KeyError, IndexError):  # a parameter missing from an older config
        return text


def unit(task: str) -> str:
    """What one test example is: an image or a patient."""
    return "images" if task in IMAGE_TASKS else "patients"


def partition_words(partition: dict[str, Any], num_sites: int, natural: bool = False) -> str:
    """How the patients are spread over the sites (``natural``: the task's sites are real
    hospitals, whatever the partition option says)."""
    name = "natural" if natural else str(partition.get("name", "natural"))
    values = {**partition, "num_sites": partition.get("num_sites") or num_sites}
    text = PARTITIONS.get(name, f"partition `{name}`")
    try:
        return text.format(**values)
    except (KeyError, IndexError):
        return text


def privacy_words(privacy: dict[str, Any]) -> str:
    """What the differential-privacy setting protects, in a sentence or two."""
    mechanism = privacy.get("mechanism", privacy.get("name", "none"))
    if mechanism == "local_dp":
        target = privacy.get("target_epsilon")
        aim = (f"calibrated so that a hospital training every round ends at epsilon <= "
               f"{target:g}" if target is not None else
               f"noise multiplier {privacy.get('noise_multiplier')}")
        return ("Local differential privacy (DP-SGD inside each hospital, Opacus): every "
                "patient's influence on a training step is clipped and noise is added inside "
                "the hospital, before anything leaves it, so the guarantee holds against "
                f"everyone, the coordinating server included ({aim}, delta "
                f"{privacy.get('target_delta')}).")
    if mechanism == "central_dp":
        return ("Central differential privacy: each hospital's update is clipped (norm "
                f"{privacy.get('clipping_norm')}, clipped at the {privacy.get('clipping')}"
                f"{', adaptively' if privacy.get('adaptive') else ''}) and noise (multiplier "
                f"{privacy.get('noise_multiplier')}) is added once to their average: it "
                "protects whether any one hospital's data took part, against whoever sees the "
                "released models (not against the server, which sees the updates).")
    return ("None: patients' records never leave their hospital, but the model updates that "
            "do carry no formal privacy guarantee.")


def secagg_words(secagg: dict[str, Any]) -> str:
    """What secure aggregation hides from the server."""
    name = str(secagg.get("name", "none"))
    text = SECURE_AGGREGATION.get(name, f"`{name}`")
    try:
        return text.format(**secagg)
    except (KeyError, IndexError):
        return text


def epsilon_strength(epsilon: float) -> str:
    """The usual reading of an epsilon: strong (<= 1), moderate (<= 10) or weak protection."""
    return "strong" if epsilon <= 1 else "moderate" if epsilon <= 10 else "weak"


def threshold_words(rule: Any, threshold: float | None, unit: str = "patients") -> str:
    """How the operating threshold was chosen and its value."""
    cut = 0.5 if threshold is None else float(threshold)
    raw = "0.5" if rule is None else str(rule).strip().lower()
    if raw == "youden":
        how = THRESHOLD_RULES["youden"]
    elif raw.startswith("sensitivity:"):
        how = THRESHOLD_RULES["sensitivity"].format(value=raw.split(":", 1)[1])
    else:
        how = "fixed"
    one = "An image" if unit == "images" else "A patient"
    return (f"{one} is called positive when the model's probability is at least "
            f"**{cut:.3f}** ({how}).")


GLOSSARY = [
    ("accuracy", "share of test patients the model classifies correctly at the operating "
                 "threshold"),
    ("AUC", "probability that the model scores a randomly chosen positive patient above a "
            "randomly chosen negative one (0.5 = chance, 1 = perfect); independent of the "
            "threshold"),
    ("sensitivity", "share of the patients who have the condition that the model flags "
                    "(TP / (TP + FN))"),
    ("specificity", "share of the patients without the condition that the model clears "
                    "(TN / (TN + FP))"),
    ("TP / FN / TN / FP", "true positives (ill, flagged), false negatives (ill, missed), true "
                          "negatives (healthy, cleared), false positives (healthy, flagged)"),
    ("pooled", "over all hospitals' test patients together (each hospital's patients are "
               "evaluated where they are; only counts and grouped statistics are combined)"),
    ("mean over sites", "the plain average of the hospitals' values: every hospital counts "
                        "the same, whatever its size"),
    ("worst site / gap", "the hospital with the lowest value, and how far it is below the "
                         "mean over sites (fairness across hospitals)"),
    ("epsilon (ε), delta (δ)", "differential privacy: with probability at least 1 - δ, "
                               "anything learned from the released models is at most e^ε "
                               "times more or less likely whether or not one patient's record "
                               "was used; smaller ε = stronger protection (about 1 strong, 8 "
                               "moderate, above 10 weak)"),
    ("round", "one cycle: the server sends the shared model, hospitals train and evaluate it, "
              "the server combines the updates"),
]
