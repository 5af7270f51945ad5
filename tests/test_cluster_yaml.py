"""cluster.yaml (AWS) and cluster-onprem.yaml (your own machines) must pass
Ray's own cluster-config validation."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"
ONPREM = CLUSTER.with_name("cluster-onprem.yaml")


def test_cluster_yaml_passes_rays_validation():
    config = yaml.safe_load(CLUSTER.read_text())
    # What `ray up` does before it touches a cloud: fill defaults, validate.
    validate_config(prepare_config(config))


def test_only_ssh_is_open_and_not_to_the_world():
    config = yaml.safe_load(CLUSTER.read_text())
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_workers_are_spot_and_the_head_is_not():
    types = yaml.safe_load(CLUSTER.read_text())["available_node_types"]
    assert types["cpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] \
        == "spot"
    assert "InstanceMarketOptions" not in types["head"]["node_config"]


def test_the_on_premises_config_passes_rays_validation_and_keeps_ports_closed():
    config = yaml.safe_load(ONPREM.read_text())
    assert config["provider"]["type"] == "local"
    validate_config(prepare_config(config))
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "ssh_private_key" in config["auth"] and "BEGIN" not in ONPREM.read_text()
