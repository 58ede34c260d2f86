"""Renders a kustomization offline, the subset of kustomize that deploy/kubernetes uses, so that
`make test` validates what `kubectl apply -k` would apply (no kustomize binary is published
on the package registries this project installs from).

Supported, with kustomize's meaning: `resources` (files of one or more documents, and
directories holding a kustomization), `namespace`, `images` (`name`, `newName`, `newTag`,
`digest`), `replicas` and `patches` whose `path` is a strategic merge patch naming its
target by kind and name. Anything else is refused rather than ignored: a field this renderer
does not apply would make the tests pass on something kustomize builds differently.

    python -m devtools.kustomize deploy/kubernetes/overlays/production
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED = frozenset(
    {"apiVersion", "kind", "resources", "namespace", "images", "replicas", "patches"}
)
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PersistentVolume",
        "StorageClass",
        "PriorityClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    }
)
# Strategic merge: these lists merge item by item on `name` (their patchMergeKey in the
# Kubernetes API); every other list is replaced by the patch's, as kustomize does.
MERGE_BY_NAME = frozenset(
    {"containers", "initContainers", "ephemeralContainers", "env", "volumes", "imagePullSecrets"}
)
WORKLOADS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})
SCALABLE = frozenset({"Deployment", "StatefulSet", "ReplicaSet"})


class KustomizeError(Exception):
    """The kustomization cannot be rendered (or uses what this renderer does not support)."""


def build(directory: Path) -> list[Object]:
    """The objects `kubectl kustomize directory` prints, in the same order."""
    path = next((directory / n for n in KUSTOMIZATION_FILES if (directory / n).is_file()), None)
    if path is None:
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise KustomizeError(f"{path}: not a mapping")
    unknown = sorted(set(spec) - SUPPORTED)
    if unknown:
        raise KustomizeError(f"{path}: {unknown} not supported by devtools.kustomize")
    objects: list[Object] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects += build(target)
        elif target.is_file():
            objects += list(_documents(target))
        else:
            raise KustomizeError(f"{path}: resource {entry} does not exist")
    _no_duplicates(objects, path)
    for patch in spec.get("patches", []):
        _patch(objects, directory, patch, path)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for replica in spec.get("replicas", []):
        _replicas(objects, replica, path)
    for image in spec.get("images", []):
        _image(objects, image, path)
    return objects


def _documents(path: Path) -> Iterator[Object]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= set(doc):
            raise KustomizeError(f"{path}: a document without apiVersion, kind and metadata")
        # A copy without YAML aliases: kustomize treats `*labels` as a copy, not a shared node.
        yield json.loads(json.dumps(doc))


def _key(obj: Object) -> tuple[str, str, str]:
    return (obj["apiVersion"].split("/")[0], obj["kind"], obj["metadata"].get("name", ""))


def _no_duplicates(objects: list[Object], path: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = _key(obj)
        if key in seen:
            raise KustomizeError(f"{path}: {key[1]}/{key[2]} defined twice")
        seen.add(key)


def _patch(objects: list[Object], directory: Path, entry: Any, path: Path) -> None:
    if not isinstance(entry, dict) or set(entry) != {"path"}:
        raise KustomizeError(f"{path}: only `patches: - path: FILE` is supported, not {entry}")
    docs = list(_documents(directory / entry["path"]))
    if len(docs) != 1:
        raise KustomizeError(f"{entry['path']}: one strategic merge patch per file")
    patch = docs[0]
    matches = [
        o
        for o in objects
        if o["kind"] == patch["kind"] and o["metadata"]["name"] == patch["metadata"]["name"]
    ]
    if len(matches) != 1:
        raise KustomizeError(
            f"{entry['path']}: {patch['kind']}/{patch['metadata']['name']} "
            f"matches {len(matches)} objects, not one"
        )
    merged = merge(matches[0], patch)
    matches[0].clear()
    matches[0].update(merged)


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """A strategic merge patch of `base` by `patch`: mappings merge, `null` deletes a key,
    the lists of MERGE_BY_NAME merge on `name`, other lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if field in MERGE_BY_NAME and isinstance(base, list) and isinstance(patch, list):
        items = [copy.deepcopy(i) for i in base]
        for item in patch:
            if not isinstance(item, dict) or "name" not in item:
                raise KustomizeError(f"{field}: a patch item without a name: {item}")
            at = next((n for n, i in enumerate(items) if i.get("name") == item["name"]), None)
            if at is None:
                items.append(copy.deepcopy(item))
            else:
                items[at] = merge(items[at], item)
        return items
    return copy.deepcopy(patch)


def _replicas(objects: list[Object], entry: dict[str, Any], path: Path) -> None:
    matches = [
        o for o in objects if o["kind"] in SCALABLE and o["metadata"]["name"] == entry["name"]
    ]
    if not matches:
        raise KustomizeError(f"{path}: replicas of {entry['name']}, which is not a workload here")
    for obj in matches:
        obj["spec"]["replicas"] = int(entry["count"])


def containers(obj: Object) -> list[Object]:
    if obj["kind"] not in WORKLOADS:
        return []
    pod = obj["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _image(objects: list[Object], entry: dict[str, Any], path: Path) -> None:
    unknown = set(entry) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise KustomizeError(f"{path}: images {sorted(unknown)} not supported")
    found = False
    for obj in objects:
        for container in containers(obj):
            name, tag = _split(container["image"])
            if name != entry["name"]:
                continue
            found = True
            name = entry.get("newName", name)
            if "digest" in entry:
                tag = f"@{entry['digest']}"
            elif "newTag" in entry:
                tag = f":{entry['newTag']}"
            container["image"] = name + tag
    if not found:
        raise KustomizeError(f"{path}: no container uses the image {entry['name']}")


def _split(image: str) -> tuple[str, str]:
    """`name` and its `:tag` or `@digest` suffix (a registry's port is part of the name)."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, f"@{digest}"
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m devtools.kustomize DIRECTORY", file=sys.stderr)
        return 2
    try:
        objects = build(Path(argv[0]))
    except KustomizeError as exc:
        print(f"kustomize: {exc}", file=sys.stderr)
        return 1
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
