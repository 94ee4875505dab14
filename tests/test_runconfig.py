"""The Hydra config -> Flower run config bridge, and the development certificates and keys."""

import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.simulate import CONF_DIR
from fl import runconfig
from fl.config import Config, register_configs
from fl.deploy.certs import make_ca_and_server, make_device_key


def composed(*overrides: str) -> dict:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data.cache_dir=/tmp/x", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_round_trip_gives_the_same_typed_config():
    resolved = composed("experiment=smoke", "privacy=both", "privacy.user.noise=local")
    values = runconfig.to_run_config(resolved, **{runconfig.OUT_DIR: "/srv/out"})
    assert set(values) == {runconfig.CONFIG_KEY, runconfig.OUT_DIR} and all(isinstance(v, str) for v in values.values())
    cfg, back = runconfig.from_run_config(values)
    assert isinstance(cfg, Config) and back == resolved
    assert cfg.privacy.user.noise == "local" and cfg.privacy.sample.noise_multiplier == 0.8
    assert cfg.model.d_model == resolved["model"]["d_model"] and cfg.federation.rounds == 2


def test_an_invalid_or_missing_config_is_refused():
    resolved = composed()
    resolved["privacy"]["name"] = "user"  # says user-level, but carries sample-level settings only
    with pytest.raises(ValueError, match="privacy.name=user"):
        runconfig.from_run_config({runconfig.CONFIG_KEY: json.dumps(resolved)})
    with pytest.raises(KeyError, match="unheard-launch"):
        runconfig.from_run_config({})


def test_development_certificates_chain_and_name_the_server(tmp_path):
    make_ca_and_server(tmp_path, hosts=("127.0.0.1", "link.example"))
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0  # private keys are not world-readable


def test_device_keys_are_openssh_ecdsa_p384_pairs(tmp_path):
    pub = make_device_key(tmp_path, "kitchen")
    private = serialization.load_ssh_private_key((tmp_path / "kitchen").read_bytes(), None)
    public = serialization.load_ssh_public_key(pub.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers()
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ") and pub.read_text().strip().endswith("kitchen")
