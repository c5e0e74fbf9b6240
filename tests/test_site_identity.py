"""Site names bound to authenticated node ids through the registration registry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from fl_app.config import ConfigError, compose_config
from fl_app.experiment import _accepted_sites
from fl_app.site_identity import check_identities, load_registry
from fl_app.sites import FederationError


@dataclass
class Claim:
    node_id: int
    name: str


REGISTRY = {"cleveland": {"node_id": 11, "fingerprint": "SHA256:a"},
            "hungary": {"node_id": 22, "fingerprint": "SHA256:b"},
            "va": {"node_id": 33, "fingerprint": "SHA256:c"}}


@pytest.fixture
def registry_file(tmp_path: Path) -> Path:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(REGISTRY))
    return path


def test_registry_maps_node_ids_to_sites(registry_file: Path) -> None:
    assert load_registry(registry_file) == {11: "cleveland", 22: "hungary", 33: "va"}


def test_impostor_unknown_node_and_double_claim_are_refused(registry_file: Path) -> None:
    registry = load_registry(registry_file)
    claims = [Claim(11, "cleveland"), Claim(22, "cleveland"),  # hungary's node claims cleveland
              Claim(33, "va"), Claim(99, "hungary")]  # 99 was never registered
    accepted, refused = check_identities(claims, registry)
    assert [(c.node_id, c.name) for c in accepted] == [(11, "cleveland"), (33, "va")]
    by_node = {r.node_id: r for r in refused}
    assert set(by_node) == {22, 99}
    assert by_node[22].claimed_site == "cleveland" and by_node[22].registered_site == "hungary"
    assert "registered as 'hungary'" in by_node[22].reason
    assert by_node[99].registered_site is None and "unknown node" in by_node[99].reason


def test_without_registry_two_claimants_of_one_site_are_both_refused() -> None:
    accepted, refused = check_identities(
        [Claim(1, "cleveland"), Claim(2, "cleveland"), Claim(3, "va")], None)
    assert [c.name for c in accepted] == ["va"]
    assert {r.node_id for r in refused} == {1, 2}
    assert all("also claims site 'cleveland'" in r.reason for r in refused)


def test_site_registry_key_gates_the_run(registry_file: Path) -> None:
    """experiment's check: refused nodes named; too few accepted sites stop the run."""
    cfg = compose_config(f"task=heart_disease site_registry={registry_file} min_sites=2")
    accepted, refused = _accepted_sites([Claim(11, "cleveland"), Claim(22, "hungary"),
                                         Claim(33, "hungary")], cfg)
    assert [c.node_id for c in accepted] == [11, 22] and [r.node_id for r in refused] == [33]
    cfg = compose_config(f"task=heart_disease site_registry={registry_file} min_sites=3")
    with pytest.raises(FederationError, match=r"only 2 site\(s\) accepted.*node 33 \(hungary\)"):
        _accepted_sites([Claim(11, "cleveland"), Claim(22, "hungary"), Claim(33, "hungary")],
                        cfg)


def test_unusable_registry_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_registry(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cleveland": {"fingerprint": "x"}}))
    with pytest.raises(ConfigError, match="'cleveland' has no integer node_id"):
        load_registry(bad)
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"a": {"node_id": 5}, "b": {"node_id": 5}}))
    with pytest.raises(ConfigError, match="node 5 is registered for both"):
        load_registry(twice)
