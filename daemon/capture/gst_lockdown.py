"""No local source in this process's GStreamer registry: what a stream names cannot make GStreamer read this machine.

A network camera's stream may name any URI: an HLS or DASH playlist lists segments, variant playlists and keys.
The adaptive demuxers fetch variants and keys with a downloader of their own (`gst_element_make_from_uri`), outside
the pipeline, where the reader's check on plugged elements never sees them. So before any pipeline is built, every
URI source factory that handles a scheme other than the network ones (`file`, `fd`, `resource`, `multifile`,
`v4l2`, `appsrc`...: filesrc, giosrc, fdsrc, multifilesrc, splitmuxsrc, v4l2src and whatever else is installed) is
removed from the registry: `make_from_uri` then finds no handler for `file://`, and `parse_launch` no `filesrc`.

What the daemon itself reads (a configured file's `filesrc`, a configured device's `v4l2src`) comes from a reference
to the factory taken before its removal, through `launch`. Each factory's plugin is loaded before the factory is
removed: a plugin loaded later (for a sibling element: giostreamsrc, multifilesink, a V4L2 decoder) would register
the factory again.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from vigild.capture.gst_pipeline import NETWORK_URI_SCHEMES
from vigild.gstreamer import gst_modules

log = logging.getLogger("vigild.capture")

KEPT = ("filesrc", "v4l2src", "appsrc")
"""Removed from the registry, but kept for the daemon's own pipelines (configured files and V4L2 devices; the
recorder's clip writers, fed by the daemon itself)."""
NETWORK_ALIASES = frozenset({"icy", "icyx", "rtsp-sdp"})
"""Other schemes of network sources, kept with them: souphttpsrc's Shoutcast (`icy://`: HTTP) and rtspsrc's
`rtsp-sdp://` (an SDP carried in the URI itself)."""

_lock = threading.Lock()
_kept: dict[str, Any] = {}
_removed: list[Any] = []
"""Every factory removed, referenced for good: an element of its type made without the registry (a plugin's own
`g_object_new`) still points at its factory, which must outlive it."""
_LOCAL_HEAD = re.compile(r'(filesrc|v4l2src) (location|device)=("(?:[^"\\]|\\.)*") ! (.+)', re.DOTALL)
"""A description that starts with a kept source and a quoted value (as vigild.capture.gst_pipeline writes it)."""


def is_local_uri_source(protocols: list[str] | tuple[str, ...]) -> bool:
    """A URI source factory handling `protocols` may read this machine: one of them is not a network scheme."""
    return not protocols or any(p.lower() not in NETWORK_URI_SCHEMES | NETWORK_ALIASES for p in protocols)


def lock_down() -> list[str]:
    """Remove every local URI source factory from the registry (see the module's text); the names removed now.

    Thread-safe and idempotent; after the first call, one scan of the registry (a few ms), so it runs before every
    pipeline is built and also removes a local source a plugin registered late."""
    gst = gst_modules()[0]
    with _lock:
        registry = gst.Registry.get()
        removed = []
        for factory in registry.get_feature_list(gst.ElementFactory):
            if factory.get_uri_type() != gst.URIType.SRC or not is_local_uri_source(factory.get_uri_protocols()):
                continue
            name = factory.get_name()
            loaded = factory.load() or factory  # None: the plugin cannot load here, so it cannot come back either
            if name in KEPT:
                _kept[name] = loaded
            _removed.append(loaded)
            registry.remove_feature(loaded)
            removed.append(name)
        if removed:
            log.debug("GStreamer: local sources removed from this process's registry: %s", ", ".join(removed))
        return removed


def kept_source(name: str) -> Any:
    """A new element of a kept factory (`filesrc`, `v4l2src`), or None where its plugin is not installed."""
    lock_down()
    factory = _kept.get(name)
    return factory.create(None) if factory is not None else None


def launch(description: str) -> Any:
    """`Gst.parse_launch(description)` after `lock_down`; a description that starts with a kept source
    (`filesrc location="…" ! …`, `v4l2src device="…" ! …`) gets it from the kept factory, linked to the element of
    the rest's first element (the one of its factory with an unlinked sink pad). Raises GLib.Error (a missing element, a bad description) or ValueError."""
    gst = gst_modules()[0]
    lock_down()
    match = _LOCAL_HEAD.fullmatch(description)
    if match is None:
        return gst.parse_launch(description)
    name, key, quoted, rest = match.groups()
    source = kept_source(name)
    if source is None:
        raise ValueError(f"no element {name!r}: its GStreamer plugin is not installed")
    source.set_property(key, re.sub(r"\\(.)", r"\1", quoted[1:-1]))
    pipeline = gst.parse_launch(rest)
    if not isinstance(pipeline, gst.Pipeline):  # one element: parse_launch returns it bare
        element, pipeline = pipeline, gst.Pipeline.new(None)
        pipeline.add(element)
    first = re.split(r"[\s!]", rest.lstrip(), maxsplit=1)[0]
    heads = [element for element in _elements(gst, pipeline) if _is_unlinked(element, first)]
    if len(heads) != 1:
        raise ValueError(f"cannot tell which element {name} feeds in {rest!r}")
    pipeline.add(source)
    if not source.link(heads[0]):
        raise ValueError(f"cannot link {name} to {heads[0].get_name()}")
    return pipeline


def _elements(gst: Any, pipeline: Any) -> list[Any]:
    elements, iterator = [], pipeline.iterate_elements()
    while (step := iterator.next())[0] == gst.IteratorResult.OK:
        elements.append(step[1])
    return elements


def _is_unlinked(element: Any, factory_name: str) -> bool:
    """`element` is of `factory_name` and nothing is linked to its sink pad yet."""
    factory = element.get_factory()
    if factory is None or factory.get_name() != factory_name:
        return False
    pad = element.get_static_pad("sink")
    return pad is not None and pad.get_peer() is None
