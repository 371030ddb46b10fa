"""Shard sources: expanding URL specs, opening any kind of URL, and pre-flight checks.

A *source* is a list of shard URLs with a sampling weight. URLs may be:

- local paths (``shards/train-{000000..000123}.tar``, brace patterns expanded here) or ``file://``;
- ``http://`` / ``https://`` (streamed with curl, as webdataset does);
- ``pipe:CMD`` — the tar is the standard output of a shell command (``pipe:aws s3 cp s3://b/x.tar -``);
- any other ``scheme://`` that fsspec knows (``s3://``, ``gs://``, ``memory://`` ...) when the
  filesystem package for it is installed (``s3fs``, ``gcsfs``).

Specs accepted by :func:`resolve_sources` (what ``data.train.urls`` may hold in a config):

- a string: one brace pattern, or several joined with ``::`` (as open_clip does); a local
  ``<prefix>.manifest.json`` written by :class:`trainer.data.shards.ShardWriter` stands for the shards
  it lists;
- a list of strings;
- a list of ``{urls: ..., weight: ...}`` mappings to mix several sources with weights.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import braceexpand

from trainer.errors import ConfigError, MissingDependencyError, MissingFileError

LOCAL_SCHEMES = ("", "file")
GOPEN_SCHEMES = ("http", "https", "pipe")


@dataclass
class Source:
    """Shard URLs drawn from together, and the weight of this source when several are mixed."""

    urls: list[str]
    weight: float = 1.0
    name: str = field(default="")


def scheme(url: str) -> str:
    """``''`` for a plain path, otherwise the URL scheme (``pipe`` for ``pipe:`` commands)."""
    if url.startswith("pipe:"):
        return "pipe"
    if "://" not in url:
        return ""
    return url.split("://", 1)[0].lower()


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand ``::``-joined strings and brace patterns into a flat list of URLs, in order."""
    parts = spec.split("::") if isinstance(spec, str) else [str(p) for p in spec]
    urls: list[str] = []
    for part in parts:
        part = os.path.expanduser(part.strip()) if scheme(part.strip()) == "" else part.strip()
        if part.endswith(".manifest.json") and scheme(part) == "":
            urls.extend(_manifest_urls(part))
        elif part:
            urls.extend(braceexpand.braceexpand(part))
    return urls


def _manifest_urls(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise MissingFileError(f"shard manifest {path} does not exist; make the shards first")
    with open(path) as f:
        manifest = json.load(f)
    folder = os.path.dirname(path)
    return [os.path.join(folder, shard["url"]) for shard in manifest["shards"]]


def resolve_sources(spec: Any) -> list[Source]:
    """Turn a config value into a list of :class:`Source` (see the module docstring for the forms)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [Source(expand_urls(spec), 1.0, spec)]
    if isinstance(spec, Mapping):
        spec = [spec]
    if not isinstance(spec, Iterable):
        raise ConfigError(f"shard URLs must be a string, a list of strings or a list of {{urls, weight}}; got {spec!r}")
    items = list(spec)
    if all(isinstance(item, str) for item in items):
        return [Source(expand_urls(items), 1.0, ",".join(items)[:80])]
    sources = []
    for item in items:
        if isinstance(item, str):
            sources.append(Source(expand_urls(item), 1.0, item))
            continue
        if not isinstance(item, Mapping) or "urls" not in item:
            raise ConfigError(f"a shard source must be a string or a mapping with 'urls' (and 'weight'); got {item!r}")
        weight = float(item.get("weight", 1.0))
        if weight <= 0:
            raise ConfigError(f"source {item['urls']!r} has weight {weight}; weights must be positive")
        name = str(item.get("name") or item["urls"])
        sources.append(Source(expand_urls(item["urls"]), weight, name))
    return sources


def local_path(url: str) -> str | None:
    """The filesystem path a local URL names, or None for remote URLs."""
    s = scheme(url)
    if s == "":
        return url
    if s == "file":
        return urllib.parse.urlparse(url).path
    return None


def check_sources(sources: list[Source], what: str = "data") -> None:
    """Fail before training starts, with a message that says what to do, on shard lists that cannot work."""
    if not sources or not any(source.urls for source in sources):
        raise ConfigError(
            f"{what}: the shard URL list is empty. Set it to a brace pattern such as "
            f"'shards/train-{{000000..000009}}.tar', a list of URLs, or make shards first "
            f"(python -m trainer.data.shapes --out DIR, or tools/make_shards.py)."
        )
    for source in sources:
        if not source.urls:
            raise ConfigError(f"{what}: source {source.name!r} expands to no URLs")
        missing = [url for url in source.urls if (path := local_path(url)) is not None and not os.path.isfile(path)]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise MissingFileError(
                f"{what}: {len(missing)} of {len(source.urls)} local shards do not exist: {shown}. "
                f"Check the path and brace range (cwd is {os.getcwd()})."
            )
        for url in source.urls:
            s = scheme(url)
            if s in LOCAL_SCHEMES or s in GOPEN_SCHEMES:
                continue
            _fsspec_filesystem(url)  # raises a clear error when the scheme is unknown or its package missing


def _fsspec_filesystem(url: str):
    import fsspec

    protocol = scheme(url)
    try:
        return fsspec.filesystem(protocol)
    except ValueError as exc:
        raise ConfigError(f"shard URL {url!r}: fsspec knows no filesystem for '{protocol}://'") from exc
    except ImportError as exc:
        raise MissingDependencyError(
            f"shard URL {url!r} needs the fsspec filesystem package for '{protocol}://' "
            f"(e.g. 'pip install s3fs' for s3://, 'pip install gcsfs' for gs://): {exc}"
        ) from exc


def open_url(url: str) -> IO[bytes]:
    """Open a shard URL for reading as a byte stream."""
    s = scheme(url)
    if s in LOCAL_SCHEMES:
        return open(local_path(url), "rb")  # noqa: SIM115 - closed by the tar reader's owner
    if s in GOPEN_SCHEMES:
        import webdataset as wds

        return wds.gopen(url, "rb")
    return _fsspec_filesystem(url).open(url, "rb")
