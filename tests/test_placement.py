"""The cluster's arithmetic and its config, without a server: shares, the fence, errors at load."""

from __future__ import annotations

import pytest

from vigild.cluster.placement import Fence, shares
from vigild.config.loading import ConfigError, load_config


def test_shares_are_even_capped_by_capacity_and_the_same_for_every_member():
    three = [("a.1", 64), ("b.1", 64), ("c.1", 64)]
    assert shares(6, three) == {"a.1": 2, "b.1": 2, "c.1": 2}
    assert shares(7, three) == {"a.1": 3, "b.1": 2, "c.1": 2}  # the remainder to the first by key
    assert shares(7, list(reversed(three))) == shares(7, three)  # whoever computes it
    four = [*three, ("d.1", 64)]
    assert sorted(shares(6, four).values()) == [1, 1, 2, 2] and sum(shares(6, four).values()) == 6
    capped = [("a.1", 1), ("b.1", 64), ("c.1", 64)]
    assert shares(9, capped) == {"a.1": 1, "b.1": 4, "c.1": 4}  # what one cannot take goes to the others
    assert shares(10, [("a.1", 2), ("b.1", 3)]) == {"a.1": 2, "b.1": 3}  # more cameras than all capacity
    assert shares(2, three) == {"a.1": 1, "b.1": 1, "c.1": 0}
    assert shares(0, three) == {"a.1": 0, "b.1": 0, "c.1": 0} and shares(5, []) == {}
    # 20 members of capacity 10 over 200 cameras: 10 each
    assert set(shares(200, [(f"m{i:02}.r", 10) for i in range(20)]).values()) == {10}


def test_the_fence_lets_through_only_events_inside_a_period_held():
    fence = Fence()
    assert not fence.allows("cam", 100.0)  # never held
    fence.open("cam", 100.0, 110.0)
    assert fence.allows("cam", 100.0) and fence.allows("cam", 110.0)
    assert not fence.allows("cam", 99.9) and not fence.allows("cam", 110.1)  # before the lease, after its fence
    fence.extend("cam", 115.0)  # renewed
    assert fence.allows("cam", 114.0)
    fence.close("cam", 112.0)  # released at 112: what it made before still goes out (from its journal too)
    assert fence.allows("cam", 111.0) and not fence.allows("cam", 113.0)
    fence.extend("cam", 200.0)  # a renewal in flight as it was released changes nothing
    assert not fence.allows("cam", 113.0) and fence.until("cam") is None


@pytest.mark.parametrize(
    ("section", "where", "expected"),
    [
        ("cluster: {nats: 'http://x:4222'}\n", ":6", "cluster.nats: expected nats://host[:port]"),
        ("cluster: {nats: 'nats://x', capacity: -1}\n", ":6", "cluster.capacity"),
        ("cluster: {nats: 'nats://x', password: p}\n", ":6", "a `password` needs a `username`"),
        ("cluster: {nats: 'nats://x', lease_ttl_s: 2, fence_margin_s: 1.5}\n", ":6", "leaves no time to renew"),
        ("outputs:\n  - {type: nats}\n", ":6", "outputs.0: a nats output needs `url` (or a `cluster:` section"),
        ("outputs:\n  - {type: nats, url: 'nats://x', stream: 'a.b'}\n", ":7", "outputs.0.stream: String should match pattern"),
    ],
)
def test_a_bad_cluster_or_nats_section_names_file_line_and_key(tmp_path, section, where, expected):
    path = tmp_path / "vigild.yaml"
    path.write_text("cameras:\n  a:\n    source: 'test://'\npublisher:\n  endpoint: 'tcp://127.0.0.1:0'\n" + section)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert f"{path}{where}" in message and expected in message, message
