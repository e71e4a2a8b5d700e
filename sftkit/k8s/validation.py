"""Names, images and quantities checked on the workstation, so that a job is never refused at ``kubectl apply``.

The rules are the API server's (DNS-1035 and DNS-1123 names, resource quantities) and the container
image reference grammar of the OCI distribution spec; each error names the flag and what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from sftkit.errors import SftkitError

LABEL_MAX = 63
SUBDOMAIN_MAX = 253
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# The pattern of resource.Quantity in every CRD's schema (sizeLimit, requests, limits).
_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY = re.compile(rf"(\+|-)?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?")
# OCI distribution reference: [registry[:port]/]path[:tag][@digest]; path components are lowercase.
_REGISTRY = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_TAG = r"(?::[\w][\w.-]{0,127})?"
_DIGEST = r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
IMAGE = re.compile(_REGISTRY + _PATH + _TAG + _DIGEST)
IMAGE_MAX = 500  # the TrainJob schema's maxLength for spec.trainer.image


def dns_1035_label(value: str, flag: str) -> str:
    """Names of TrainJobs and PyTorchJobs: their pods and services are named after them."""
    if len(value) > LABEL_MAX or not DNS_1035_LABEL.fullmatch(value):
        raise SftkitError(
            f"{flag} {value!r} is not a valid name: at most {LABEL_MAX} characters, lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit (RFC 1035 label)"
        )
    return value


def dns_1123_label(value: str, flag: str) -> str:
    if len(value) > LABEL_MAX or not DNS_1123_LABEL.fullmatch(value):
        raise SftkitError(
            f"{flag} {value!r} is not a valid name: at most {LABEL_MAX} characters, lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (RFC 1123 label)"
        )
    return value


def dns_1123_subdomain(value: str, flag: str) -> str:
    """Names of ConfigMaps, Secrets, claims and runtimes."""
    if len(value) > SUBDOMAIN_MAX or not DNS_1123_SUBDOMAIN.fullmatch(value):
        raise SftkitError(
            f"{flag} {value!r} is not a valid name: at most {SUBDOMAIN_MAX} characters, lowercase letters, digits, "
            "'-' and '.', starting and ending with a letter or digit (RFC 1123 subdomain)"
        )
    return value


def image_reference(value: str, flag: str = "--image") -> str:
    if not value or len(value) > IMAGE_MAX or not IMAGE.fullmatch(value):
        raise SftkitError(
            f"{flag} {value!r} is not a container image reference: write REGISTRY/REPOSITORY:TAG (for example "
            f"ghcr.io/your-org/sftkit:0.1.0), repository in lowercase, no spaces, at most {IMAGE_MAX} characters"
        )
    return value


def positive_quantity(value: str, flag: str, examples: str = "16Gi, 512Mi or 64G") -> str:
    number = re.match(r"\+?([0-9.]+)", value)
    if not QUANTITY.fullmatch(value) or number is None or float(number.group(1)) <= 0:
        raise SftkitError(
            f"{flag} {value!r} is not a Kubernetes quantity: a positive number with an optional suffix, e.g. {examples}"
        )
    return value


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The Trainer's torch webhook rejects a TrainJob whose env sets these; the operators set them, per pod.
TORCHRUN_RESERVED = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
# Set per pod by the v1 operator, or read by sftkit launch as torchrun-style variables: one value for every pod
# would give them all the same rank.
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NNODES", "NODE_RANK",
                        "GROUP_RANK", "NPROC_PER_NODE")


def environment_variable(value: str) -> tuple[str, str]:
    """A NAME=VALUE for every pod's environment."""
    name, separator, text = value.partition("=")
    if not separator or not ENV_NAME.fullmatch(name):
        raise SftkitError(f"--env {value!r}: write NAME=VALUE, e.g. --env NCCL_DEBUG=INFO")
    if name in TORCHRUN_RESERVED or name in RENDEZVOUS_VARIABLES:
        raise SftkitError(
            f"--env {name}: the operator sets {name} in each pod (and a TrainJob that sets it is rejected); "
            "sftkit launch reads the rendezvous from the operator's variables"
        )
    return name, text


@dataclass(frozen=True)
class VolumeSpec:
    """A persistent volume claim and where it is mounted in every pod."""

    claim: str
    mount: str


def volume_spec(value: str) -> VolumeSpec:
    claim, separator, mount = value.partition(":")
    if not separator or not claim or not mount:
        raise SftkitError(f"--volume {value!r}: write CLAIM:MOUNT, e.g. --volume sft-data:/data")
    dns_1123_subdomain(claim, "--volume: the claim")
    path = PurePosixPath(mount)
    if not path.is_absolute() or path == PurePosixPath("/") or ":" in mount or ".." in path.parts:
        raise SftkitError(f"--volume {value!r}: the mount point must be an absolute directory other than /, e.g. /data")
    return VolumeSpec(claim, str(path))


_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIXES = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
                     "E": 1e18}


def quantity_value(value: str) -> float:
    """A quantity checked by positive_quantity, as a plain number (bytes for memory), to compare two of them."""
    number, suffix = re.fullmatch(r"\+?([0-9.]+(?:[eE][-+]?[0-9.]+)?)([a-zA-Z]*)", value).groups()
    return float(number) * _BINARY_SUFFIXES.get(suffix, _DECIMAL_SUFFIXES.get(suffix, 1))


# A label key (node selectors, tolerations): an optional DNS subdomain and '/', then a name of at most 63 characters.
LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
IMAGE_PULL_POLICIES = ("Always", "IfNotPresent", "Never")


def _label_key(key: str, flag: str, value: str) -> str:
    prefix, _, name = key.rpartition("/")
    if (len(name) > LABEL_MAX or not LABEL_NAME.fullmatch(name)
            or (prefix and (len(prefix) > SUBDOMAIN_MAX or not DNS_1123_SUBDOMAIN.fullmatch(prefix)))):
        raise SftkitError(
            f"{flag} {value!r}: {key!r} is not a label key: an optional DNS prefix and '/', then at most {LABEL_MAX} "
            "letters, digits, '-', '_' and '.', starting and ending with a letter or digit (e.g. "
            "nvidia.com/gpu.product)"
        )
    return key


def _label_value(text: str, flag: str, value: str) -> str:
    if text and (len(text) > LABEL_MAX or not LABEL_NAME.fullmatch(text)):
        raise SftkitError(f"{flag} {value!r}: {text!r} is not a label value: at most {LABEL_MAX} letters, digits, "
                          "'-', '_' and '.', starting and ending with a letter or digit")
    return text


def node_selector(value: str) -> tuple[str, str]:
    """--node-selector KEY=VALUE: pods go only to nodes with that label."""
    key, separator, text = value.partition("=")
    if not separator or not key:
        raise SftkitError(f"--node-selector {value!r}: write KEY=VALUE, e.g. --node-selector "
                          "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3")
    return _label_key(key, "--node-selector", value), _label_value(text, "--node-selector", value)


@dataclass(frozen=True)
class Toleration:
    """A taint the pods tolerate: the key's any value (operator Exists) when value is None, else that value."""

    key: str
    value: str | None
    effect: str


def toleration(value: str) -> Toleration:
    """--toleration KEY[=VALUE]:EFFECT, e.g. cloud.google.com/gke-spot=true:NoSchedule."""
    taint, separator, effect = value.rpartition(":")
    key, equals, text = taint.partition("=")
    if not separator or not key:
        raise SftkitError(f"--toleration {value!r}: write KEY[=VALUE]:EFFECT, e.g. --toleration "
                          "nvidia.com/gpu:NoSchedule or --toleration cloud.google.com/gke-spot=true:NoSchedule")
    if effect not in TAINT_EFFECTS:
        raise SftkitError(f"--toleration {value!r}: the effect {effect!r} is not one of {', '.join(TAINT_EFFECTS)}")
    return Toleration(_label_key(key, "--toleration", value),
                      _label_value(text, "--toleration", value) if equals else None, effect)
